"""How a session reaches the broker: the transport interface and its ZeroMQ form.

A session speaks through a :class:`Transport`: it sends request objects, waits
for replies and for events, and subscribes to event topics. The transport is
chosen by the URL's scheme, so a session can later run on another engine
without changing the session code.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from fleetbus import log
from fleetbus.errors import BadInput, BrokerUnavailable, FleetbusError
from fleetbus.security import apply_client_curve
from fleetbus.wire import MAX_BROKER_MESSAGE_BYTES, decode, encode


def _log() -> Any:
    # Bound when used, not at import, so that a later log.configure() applies.
    return log.get("fleetbus.client.transport")


Event = tuple[bytes, dict[str, Any]]

ZMQ_SCHEMES = frozenset({"ipc", "tcp", "inproc"})


class Transport(Protocol):
    """What a session needs from the connection to its broker."""

    url: str

    def send(self, message: dict[str, Any]) -> None:
        """Queue one request for the broker; never blocks."""

    async def replies(self) -> list[dict[str, Any]]:
        """Wait until at least one reply is in, then return every ready one."""

    def attach_events(self, pub: Any) -> None:
        """Connect the event channel to what the ``hello`` reply named."""

    def subscribe(self, topic: bytes) -> None:
        """Receive events whose topic starts with ``topic``."""

    async def events(self) -> list[Event]:
        """Wait until at least one event is in, then return every ready one."""

    def close(self) -> None:
        """Close every socket at once, dropping anything unsent."""


def open_transport(url: str) -> Transport:
    """The transport for ``url``, chosen by its scheme."""
    scheme = url.partition("://")[0]
    if scheme in ZMQ_SCHEMES and "://" in url:
        return ZmqTransport(url)
    raise BadInput(f"unsupported broker URL {url!r} (use ipc://, tcp:// or inproc://)")


class ZmqTransport:
    """A DEALER for requests and a SUB for events, on ``zmq.asyncio``.

    Receiving awaits one message, then drains the rest with non-blocking
    receives on a synchronous shadow of the same socket: awaiting every message
    costs several times more per message.

    Sends go through the asyncio socket, never the shadow. A ZeroMQ socket
    signals readiness by edges on one file descriptor, and any operation can
    consume a pending edge; only the asyncio socket's own operations re-check
    the socket's state afterwards, so a send on the shadow could leave a reply
    waiting unseen.
    """

    def __init__(self, url: str, context: zmq.asyncio.Context | None = None) -> None:
        self.url = url
        self._ctx = context or zmq.asyncio.Context.instance()
        self._pub: str | None = None
        self._topics: list[bytes] = []
        try:
            self._control = self._socket(zmq.DEALER)
            self._control.connect(url)
            self._events = self._socket(zmq.SUB)
        except zmq.ZMQError as exc:
            self.close()
            raise BrokerUnavailable(f"cannot connect to {url}: {exc}") from exc
        self._control_sync: zmq.Socket[bytes] = zmq.Socket.shadow(
            self._control.underlying
        )
        self._events_sync: zmq.Socket[bytes] = zmq.Socket.shadow(
            self._events.underlying
        )

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        apply_client_curve(sock, self.url)
        return sock

    def send(self, message: dict[str, Any]) -> None:
        """Queue one request; a full queue drops it, as a lost packet would."""
        try:
            sent = cast(
                "asyncio.Future[Any]",
                self._control.send(encode(message), zmq.NOBLOCK),
            )
        except zmq.ZMQError as exc:
            raise BrokerUnavailable(f"cannot send to {self.url}: {exc}") from exc
        error = sent.exception() if sent.done() else None
        if isinstance(error, zmq.Again):
            _log().debug("request.dropped", rid=message.get("rid"))
        elif error is not None:
            raise BrokerUnavailable(f"cannot send to {self.url}: {error}") from error

    async def replies(self) -> list[dict[str, Any]]:
        """The next reply and every other one already in."""
        frames = await self._control.recv_multipart()
        first = _decode(frames)
        rest = [body for _, body in _drain(self._control_sync, topic=False)]
        return rest if first is None else [first, *rest]

    def attach_events(self, pub: Any) -> None:
        """Connect (or move) the SUB to the broker's publisher."""
        address = pub_address(self.url, pub)
        if address == self._pub:
            return
        if self._pub is not None:
            self._events.disconnect(self._pub)
        self._events.connect(address)
        self._pub = address

    def subscribe(self, topic: bytes) -> None:
        """Subscribe the SUB to a topic prefix."""
        if topic not in self._topics:
            self._events.setsockopt(zmq.SUBSCRIBE, topic)
            self._topics.append(topic)

    async def events(self) -> list[Event]:
        """Every event ready once the SUB turns readable (possibly none).

        Subscribing changes the socket outside the asyncio wrapper, which can
        swallow a readiness edge; the bounded wait makes such a loss cost at
        most a fraction of a second instead of a stall.
        """
        await self._events.poll(timeout=_EVENT_RECHECK_MS)
        return _drain(self._events_sync, topic=True)

    def close(self) -> None:
        """Close both sockets with linger 0."""
        for name in ("_control", "_events"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close(linger=0)


_EVENT_RECHECK_MS = 250

# One drain never takes more than this many messages, so that a flood on one
# socket cannot starve the other tasks of the event loop.
_DRAIN_LIMIT = 4096


def _drain(sock: zmq.Socket[Any], *, topic: bool) -> list[Event]:
    out: list[Event] = []
    for _ in range(_DRAIN_LIMIT):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        if not topic:
            body = _decode(frames)
            if body is not None:
                out.append((b"", body))
            continue
        # An event message is a topic and one event frame per event.
        for frame in frames[1:]:
            event = _decode([frame])
            if event is not None:
                out.append((frames[0], event))
    return out


def _decode(frames: list[bytes]) -> dict[str, Any] | None:
    try:
        return decode(frames[-1], limit=MAX_BROKER_MESSAGE_BYTES)
    except FleetbusError as exc:
        _log().warning("message.undecodable", error=str(exc))
        return None


def pub_address(url: str, pub: Any) -> str:
    """The event address named by a ``hello`` reply, relative to ``url``.

    For ``tcp://`` the broker names a port and the client keeps the host it
    dialled; for ``ipc://`` it names a path. A full URL is taken as it is.
    """
    scheme = url.partition("://")[0]
    if scheme == "tcp":
        port: Any = pub
        if isinstance(pub, str) and "://" in pub:
            port = urlsplit(pub).port
        host = urlsplit(url).hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"tcp://{host}:{int(port)}"
    if isinstance(pub, str) and "://" in pub:
        return pub
    return f"{scheme}://{pub}"
