"""How a session reaches the broker: the transport interface and its ZeroMQ form.

A session speaks through a :class:`Transport`: it sends request objects, waits
for replies and for events, and subscribes to event topics. The transport is
chosen by the URL's scheme, so a session can later run on another engine
without changing the session code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import zmq

from fleetbus import log
from fleetbus.errors import (
    BadInput,
    BrokerUnavailable,
    FleetbusError,
    LimitExceeded,
)
from fleetbus.security import apply_client_curve
from fleetbus.wire import (
    MAX_BROKER_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES,
    decode,
    encode,
)


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

    def on_replies(self, deliver: Callable[[dict[str, Any]], None]) -> None:
        """Hand each reply to ``deliver`` as it comes, instead of :meth:`replies`.

        Called on the running loop; ``deliver`` runs in the loop's reader
        callback, so a waiting request wakes without a reader task between.
        """

    def attach_events(self, pub: Any) -> None:
        """Connect the event channel to what the ``hello`` reply named."""

    def subscribe(self, topic: bytes) -> None:
        """Receive events whose topic starts with ``topic``.

        Subscriptions are counted: each must be undone by one
        :meth:`unsubscribe`, and the topic is dropped with the last.
        """

    def unsubscribe(self, topic: bytes) -> None:
        """Undo one :meth:`subscribe` of ``topic``."""

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
    """A DEALER for requests and a SUB for events, read on the running loop.

    Each socket's file descriptor is watched by the event loop's selector;
    a wait for replies or events drains every message ready with
    non-blocking receives and parks on a future only when there is none.
    This costs one wake-up per batch, where an awaited receive per message
    costs several times more.

    A ZeroMQ socket signals readiness by edges on one file descriptor, and
    any operation on the socket (a send, a subscription) can consume a
    pending edge. So after each such operation the socket's ``EVENTS`` are
    checked, and a waiting reader is woken if a message is in.
    """

    def __init__(self, url: str, context: zmq.Context[Any] | None = None) -> None:
        self.url = url
        self._ctx = context or zmq.Context.instance()
        self._pub: str | None = None
        # Subscribed topics, with how many subscribe calls each has left.
        self._topics: dict[bytes, int] = {}
        try:
            self._control = self._socket(zmq.DEALER)
            self._control.setsockopt(zmq.SNDHWM, _SEND_QUEUE)
            self._control.connect(url)
            self._events = self._socket(zmq.SUB)
        except zmq.ZMQError as exc:
            self.close()
            raise BrokerUnavailable(f"cannot connect to {url}: {exc}") from exc
        self._replies_in = _Inbox(self._control, topic=False)
        self._events_in = _Inbox(self._events, topic=True)

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        apply_client_curve(sock, self.url)
        return sock

    def send(self, message: dict[str, Any]) -> None:
        """Queue one request; a full queue drops it, as a lost packet would.

        A request the broker would refuse for its size raises
        :class:`LimitExceeded` here: past a bound the broker drops the whole
        connection, which the process's other sessions share.
        """
        body = encode(message)
        if len(body) > MAX_MESSAGE_BYTES:
            raise LimitExceeded(
                f"request of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}",
                limit="message_bytes",
            )
        try:
            self._control.send(body, _NOBLOCK)
        except zmq.Again:
            _log().debug("request.dropped", rid=message.get("rid"))
        except zmq.ZMQError as exc:
            raise BrokerUnavailable(f"cannot send to {self.url}: {exc}") from exc
        self._replies_in.recheck()

    async def replies(self) -> list[dict[str, Any]]:
        """The next reply and every other one already in."""
        return [body for _, body in await self._replies_in.batch()]

    def on_replies(self, deliver: Callable[[dict[str, Any]], None]) -> None:
        """Hand each reply to ``deliver`` from the loop's reader callback."""
        self._replies_in.deliver_to(deliver)

    def attach_events(self, pub: Any) -> None:
        """Connect (or move) the SUB to the broker's publisher."""
        address = pub_address(self.url, pub)
        if address == self._pub:
            return
        if self._pub is not None:
            self._events.disconnect(self._pub)
        self._events.connect(address)
        self._pub = address
        self._events_in.recheck()

    def subscribe(self, topic: bytes) -> None:
        """Subscribe the SUB to a topic prefix, or count one more user of it."""
        count = self._topics.get(topic, 0)
        self._topics[topic] = count + 1
        if not count:
            self._events.setsockopt(zmq.SUBSCRIBE, topic)
            self._events_in.recheck()

    def unsubscribe(self, topic: bytes) -> None:
        """Count one user of a topic prefix fewer; drop it with the last."""
        count = self._topics.get(topic, 0)
        if count > 1:
            self._topics[topic] = count - 1
        elif count == 1:
            del self._topics[topic]
            if not self._events.closed:
                self._events.setsockopt(zmq.UNSUBSCRIBE, topic)
                self._events_in.recheck()

    @property
    def topics(self) -> dict[bytes, int]:
        """Each subscribed topic prefix with its count of users."""
        return dict(self._topics)

    async def events(self) -> list[Event]:
        """The next events and every other one already in."""
        return await self._events_in.batch()

    def close(self) -> None:
        """Close both sockets with linger 0."""
        for inbox in ("_replies_in", "_events_in"):
            found = getattr(self, inbox, None)
            if found is not None:
                found.close()
        for name in ("_control", "_events"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close(linger=0)


# Requests queued before sends are dropped: one DEALER carries the requests
# of every session of a process, so a burst of them must fit.
_SEND_QUEUE = 100_000
# One drain never takes more than this many messages, so that a flood on one
# socket cannot starve the other tasks of the event loop.
_DRAIN_LIMIT = 4096
# Plain ints: flag enums cost a Python call per operation.
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


class _Inbox:
    """Batches of messages from one socket, waited for on the loop's selector.

    ``_maybe`` says a message may be in without an edge to tell of it (one
    was taken while nobody waited, or a drain stopped at its limit), so the
    next batch drains before it waits; otherwise it waits first, which spares
    a receive that would find nothing.
    """

    def __init__(self, sock: zmq.Socket[bytes], *, topic: bool) -> None:
        self._sock = sock
        self._topic = topic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._maybe = True
        self._deliver: Callable[[dict[str, Any]], None] | None = None
        self._pumping = False

    async def batch(self) -> list[Event]:
        """Every message ready, waiting until there is at least one."""
        out = self._drain() if self._maybe else []
        while not out:
            loop = asyncio.get_running_loop()
            if self._loop is None:
                loop.add_reader(self._sock.FD, self._readable)
                self._loop = loop
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            out = self._drain()
        return out

    def deliver_to(self, deliver: Callable[[dict[str, Any]], None]) -> None:
        """Push every message's body to ``deliver`` instead of batching them."""
        loop = asyncio.get_running_loop()
        self._deliver = deliver
        if self._loop is None:
            loop.add_reader(self._sock.FD, self._readable)
            self._loop = loop
        self._schedule()

    def _schedule(self) -> None:
        if not self._pumping and self._loop is not None:
            self._pumping = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pumping = False
        deliver = self._deliver
        if deliver is None or self._sock.closed:
            return
        out, full = _receive(self._sock, topic=False)
        for _, body in out:
            deliver(body)
        if full:
            # The rest waits its turn behind the loop's other callbacks.
            self._schedule()

    def _readable(self) -> None:
        if self._deliver is not None:
            self._pump()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
            return
        # Nobody to wake: reading EVENTS takes the edge, so that the
        # descriptor stays quiet until something new arrives.
        self._sock.getsockopt(_EVENTS)
        self._maybe = True

    def recheck(self) -> None:
        """After an operation on the socket: a message may be in unannounced."""
        if self._deliver is not None:
            if int(self._sock.getsockopt(_EVENTS)) & _POLLIN:
                self._schedule()
            return
        waiter = self._waiter
        if waiter is None:
            self._maybe = True
        elif int(self._sock.getsockopt(_EVENTS)) & _POLLIN and not waiter.done():
            waiter.set_result(None)

    def _drain(self) -> list[Event]:
        out, full = _receive(self._sock, topic=self._topic)
        self._maybe = full
        return out

    def close(self) -> None:
        """Stop watching the socket."""
        self._deliver = None
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed() and not self._sock.closed:
            loop.remove_reader(self._sock.FD)


def _drain(sock: zmq.Socket[Any], *, topic: bool) -> list[Event]:
    """Every message ready on ``sock``, up to a limit, decoded."""
    return _receive(sock, topic=topic)[0]


def _receive(sock: zmq.Socket[Any], *, topic: bool) -> tuple[list[Event], bool]:
    """:func:`_drain`, and whether it stopped at its limit with more to come."""
    out: list[Event] = []
    for _ in range(_DRAIN_LIMIT):
        try:
            # A reply is one frame; an event message is a topic and one frame
            # per event.
            if not topic:
                frame = sock.recv(_NOBLOCK)
            else:
                frames = sock.recv_multipart(_NOBLOCK)
        except zmq.Again:
            return out, False
        if not topic:
            body = _decode(frame)
            if body is not None:
                out.append((b"", body))
            continue
        for frame in frames[1:]:
            event = _decode(frame)
            if event is not None:
                out.append((frames[0], event))
    return out, True


def _decode(frame: bytes) -> dict[str, Any] | None:
    try:
        return decode(frame, limit=MAX_BROKER_MESSAGE_BYTES)
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
