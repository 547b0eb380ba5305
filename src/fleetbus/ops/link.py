"""A plain, blocking line to the broker for the operating commands.

The watching commands need no session of their own: they send ``status``,
``snapshot`` and ``facts`` requests on a DEALER socket and read events on a
SUB socket, so that watching a fleet never shows up in it.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import zmq

from fleetbus import config, paths, wire
from fleetbus.client.transport import pub_address
from fleetbus.errors import BrokerUnavailable, FleetbusError, error_from_wire
from fleetbus.security import apply_client_curve

DEFAULT_TIMEOUT_S = 3.0


def resolve_url(url: str | None) -> str:
    """The broker URL: ``url``, else ``$FLEETBUS_URL``, else the config file's.

    Falls back on the local default socket; a bad config file is ignored here
    (the broker reports it when it starts).
    """
    if url:
        return url
    if os.environ.get(paths.URL_ENV):
        return paths.default_url()
    try:
        configured = config.load({})["url"]
    except config.ConfigError:
        configured = None
    return configured or paths.default_url()


class Link:
    """A DEALER for requests and, once :meth:`subscribe` is called, a SUB."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url
        self.timeout = timeout
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        apply_client_curve(self.dealer, url)
        self.dealer.connect(url)
        self.sub: zmq.Socket[Any] | None = None
        self._prefix = secrets.token_hex(4)
        self._count = 0

    def close(self) -> None:
        """Close both sockets."""
        self.dealer.close(linger=0)
        if self.sub is not None:
            self.sub.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; raise its error if any.

        Raises :class:`BrokerUnavailable` when nothing comes back in time.
        """
        self._count += 1
        rid = f"ops-{self._prefix}-{self._count}"
        self.dealer.send(wire.encode({"op": op, "rid": rid, **fields}))
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.dealer.poll(int(remaining * 1000) + 1):
                raise BrokerUnavailable(
                    f"no answer from the broker at {self.url} "
                    f"within {self.timeout:g}s; is it running?"
                )
            reply = wire.decode(self.dealer.recv())
            if reply.get("rid") != rid:
                continue
            if reply.get("ok"):
                return reply
            raise error_from_wire(reply.get("error") or {})

    def subscribe(self, topics: list[bytes]) -> None:
        """Open the event socket (its address comes from ``status``) and subscribe."""
        status = self.request("status")
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        for topic in topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        address = pub_address(self.url, status["pub"])
        apply_client_curve(self.sub, address)
        self.sub.connect(address)

    def events(self, timeout: float) -> list[tuple[bytes, dict[str, Any]]]:
        """Events that arrive within ``timeout`` seconds (all that are ready)."""
        assert self.sub is not None
        out: list[tuple[bytes, dict[str, Any]]] = []
        if not self.sub.poll(max(0, int(timeout * 1000))):
            return out
        while True:
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            for frame in frames[1:]:
                try:
                    out.append((frames[0], wire.decode(frame)))
                except FleetbusError:
                    continue


def repo_topics(repo: str | None) -> list[bytes]:
    """The SUB prefixes of every claims and facts event of ``repo`` (or all)."""
    if repo is None:
        return [wire.CLAIMS_KIND, wire.FACTS_KIND]
    return [wire.claims_topic(repo), wire.FACTS_KIND + repo.encode() + wire.SEP]
