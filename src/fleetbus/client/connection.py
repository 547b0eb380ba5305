"""One connection to a broker per process and event loop, shared by its sessions.

Sessions of one process that talk to the same broker (same URL, same
credentials, same asyncio loop) share a :class:`Connection`: one DEALER for
requests, whose replies are routed back by request id, and one SUB for events,
each decoded once. Sessions of one repository share a :class:`Replica` of its
claim table, fed each event once, resynced from one snapshot for all of them
after a gap or a broker restart. Each session keeps its own identity: its sid,
lease, grants, own changes and listeners.

The last session to close a connection closes its sockets.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleetbus import log, wire
from fleetbus.claims import ClaimView
from fleetbus.client.transport import Transport, open_transport
from fleetbus.errors import BrokerUnavailable, FleetbusError, TimedOut, error_from_wire
from fleetbus.security import CLIENT_KEY_ENV, SERVER_KEY_ENV

if TYPE_CHECKING:
    from fleetbus.client.session import AsyncSession


def _log() -> Any:
    # Bound when used, not at import, so that a later log.configure() applies.
    return log.get("fleetbus.client")


# Retries of an unanswered request start fast (a lost message on a local
# socket is rare and cheap to repeat) and back off to once a second.
_FIRST_RETRY_S = 0.2
_MAX_RETRY_S = 1.0
# One timer serves every unanswered request, set for the earliest retry or
# deadline among them; what falls due within this much of it is served too.
_TICK_SLACK_S = 0.001
_REPAIR_BACKOFF_S = 0.2
# Events buffered while a snapshot is on its way; beyond this the replica will
# start over anyway, so older ones are dropped.
_MAX_BUFFER = 100_000


class SessionClosed(FleetbusError):
    """The session was closed while, or before, a request was made."""

    code = "closed"


class Pending:
    """A request waiting for its reply, kept for retries and re-sends."""

    __slots__ = (
        "deadline",
        "delay",
        "future",
        "limit",
        "message",
        "owner",
        "patience",
        "queued",
        "retry",
    )

    def __init__(
        self,
        message: dict[str, Any],
        future: asyncio.Future[dict[str, Any]],
        owner: object,
    ) -> None:
        self.message = message
        self.future = future
        self.owner = owner
        self.queued = False
        self.deadline = 0.0
        self.patience = 0.0
        self.limit = 0.0
        self.delay = 0.0
        self.retry = 0.0


class Connection:
    """One DEALER and one SUB to a broker, shared by the sessions of a loop."""

    def __init__(self, key: tuple[Any, ...], url: str) -> None:
        self.key = key
        self.url = url
        self.loop = asyncio.get_running_loop()
        self.transport: Transport = open_transport(url)
        self.pending: dict[str, Pending] = {}
        self.sessions: set[AsyncSession] = set()
        self.replicas: dict[str, Replica] = {}
        self._by_topic: dict[bytes, Replica] = {}
        self._by_repo: dict[bytes, Replica] = {}
        self.transport.on_replies(self.on_reply)
        self._events: asyncio.Task[None] | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._ticker_at = math.inf
        self.closed = False
        self.replied_at = 0.0
        """When a reply last came in, on the event loop's clock (0: never)."""

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<Connection {self.url!r} sessions={len(self.sessions)} "
            f"replicas={len(self.replicas)} {state}>"
        )

    # -- sessions -------------------------------------------------------------

    def attach(self, session: AsyncSession) -> None:
        """Count ``session`` among the users of the connection."""
        self.sessions.add(session)

    def detach(self, session: AsyncSession) -> None:
        """Forget ``session``; the last one out closes the sockets."""
        self.sessions.discard(session)
        for pending in list(self.pending.values()):
            if pending.owner is session and not pending.future.done():
                pending.future.set_exception(SessionClosed("the session was closed"))
        if not self.sessions:
            self.close()

    def replica(self, repo: str) -> Replica:
        """The replica of ``repo``, subscribed to its claims stream."""
        replica = self.replicas.get(repo)
        if replica is None:
            replica = self.replicas[repo] = Replica(self, repo)
            topic = self.follow(repo)
            self._by_topic[topic] = replica
            self._by_repo[repo.encode()] = replica
            if self._events is None:
                self._events = self.loop.create_task(self._read_events())
        return replica

    def follow(self, repo: str) -> bytes:
        """Subscribe to ``repo``'s claims stream; its topic.

        Subscribing ahead of a join gives the subscription a round trip's
        start on the join's own event. Each call is undone by one
        :meth:`unfollow`; the subscription goes with the last.
        """
        topic = wire.claims_topic(repo)
        self.transport.subscribe(topic)
        return topic

    def unfollow(self, repo: str) -> None:
        """Undo one :meth:`follow` of ``repo``."""
        if not self.closed:
            self.transport.unsubscribe(wire.claims_topic(repo))

    def forget(self, replica: Replica) -> None:
        """Stop feeding ``replica``: its last session has gone."""
        if self.replicas.get(replica.repo) is not replica:
            return
        del self.replicas[replica.repo]
        del self._by_topic[wire.claims_topic(replica.repo)]
        del self._by_repo[replica.repo.encode()]
        self.unfollow(replica.repo)

    def close(self) -> None:
        """Stop reading and close the sockets, failing whatever still waits."""
        if self.closed:
            return
        self.closed = True
        _forget(self)
        if self._ticker is not None:
            self._ticker.cancel()
        for replica in list(self.replicas.values()):
            replica.close()
        if not self.loop.is_closed():
            # A loop already closed has nothing left waiting to be told.
            if self._events is not None:
                self._events.cancel()
            for pending in self.pending.values():
                if not pending.future.done():
                    failure = SessionClosed("the session was closed")
                    pending.future.set_exception(failure)
        self.transport.close()

    # -- requests -------------------------------------------------------------

    async def exchange(
        self,
        message: dict[str, Any],
        owner: object,
        limit: float,
        patience: float | None = None,
    ) -> dict[str, Any]:
        """Send ``message`` and return its reply, re-sending it until answered.

        ``limit`` is how long to wait for any answer; ``patience`` how long the
        broker may keep a queued request before its final reply. The reply is
        returned as it came, ``ok`` or not.
        """
        if self.closed:
            raise SessionClosed("the session is closed")
        loop = self.loop
        rid = message["rid"]
        pending = Pending(message, loop.create_future(), owner)
        now = loop.time()
        pending.limit = limit
        pending.deadline = now + limit
        pending.patience = (patience or 0.0) + limit
        pending.delay = min(_FIRST_RETRY_S, limit)
        pending.retry = now + pending.delay
        self.pending[rid] = pending
        if pending.retry < self._ticker_at:
            self._tick_at(pending.retry)
        try:
            self.transport.send(message)
            return await pending.future
        finally:
            if self.pending.get(rid) is pending:
                del self.pending[rid]

    def _tick_at(self, when: float) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self._ticker = self.loop.call_at(when, self._tick)
        self._ticker_at = when

    def _tick(self) -> None:
        """Re-send unanswered requests, and fail those whose time is up."""
        self._ticker = None
        self._ticker_at = math.inf
        now = self.loop.time() + _TICK_SLACK_S
        due = math.inf
        for pending in list(self.pending.values()):
            if not pending.future.done():
                self._check(pending, now)
            if not pending.future.done():
                next_due = pending.deadline
                if not pending.queued:
                    next_due = min(next_due, pending.retry)
                due = min(due, next_due)
        if due < math.inf and not self.closed:
            self._tick_at(due)

    def _check(self, pending: Pending, now: float) -> None:
        if now >= pending.deadline:
            pending.future.set_exception(self._no_answer(pending))
        elif not pending.queued and now >= pending.retry:
            try:
                self.transport.send(pending.message)
            except BrokerUnavailable as exc:
                pending.future.set_exception(exc)
                return
            pending.delay = min(pending.delay * 2, _MAX_RETRY_S)
            pending.retry = now + pending.delay

    def _no_answer(self, pending: Pending) -> FleetbusError:
        op = pending.message["op"]
        if pending.queued:
            return TimedOut(f"no final answer to a queued {op} from the broker")
        return BrokerUnavailable(
            f"no answer to {op} from the broker at {self.url} within {pending.limit:g}s"
        )

    def resend_queued(self, owner: object) -> None:
        """A restarted broker gets ``owner``'s queued requests again."""
        for pending in list(self.pending.values()):
            if pending.owner is owner and pending.queued:
                self.transport.send(pending.message)

    def on_reply(self, reply: dict[str, Any]) -> None:
        """Hand one reply to the request waiting for it."""
        self.replied_at = self.loop.time()
        pending = self.pending.get(reply.get("rid"))  # type: ignore[arg-type]
        if pending is None:
            if reply.get("rid") is None:
                _log().warning("reply.protocol_error", error=reply.get("error"))
            return
        if reply.get("ok") and reply.get("queued"):
            pending.queued = True
            pending.deadline = self.loop.time() + pending.patience
            return
        if not pending.future.done():
            pending.future.set_result(reply)

    # -- events ---------------------------------------------------------------

    async def _read_events(self) -> None:
        facts = wire.FACTS_KIND[0]
        while True:
            for topic, event in await self.transport.events():
                if topic[0] == facts:
                    self._on_fact_event(topic, event)
                    continue
                replica = self._by_topic.get(topic)
                if replica is not None:
                    replica.on_event(event)

    def _on_fact_event(self, topic: bytes, event: dict[str, Any]) -> None:
        end = topic.find(wire.SEP, 1)
        replica = self._by_repo.get(topic[1:end])
        if replica is not None:
            for session in list(replica.sessions):
                session._on_fact_event(topic, event)


class Replica:
    """One repository's claim replica, shared by the sessions that follow it.

    It follows the claims stream event by event, checking each event's
    ``prev``; a gap, a heartbeat ahead of what it applied, or a new broker
    epoch makes it start over from one snapshot, for every session at once.
    Sessions that must join again (a restarted broker) do so first.
    """

    def __init__(self, connection: Connection, repo: str) -> None:
        self.connection = connection
        self.repo = repo
        self.view = ClaimView()
        self.lock = threading.Lock()
        self.applied = 0
        self.epoch = 0
        self.syncing = True
        self.synced_once = False
        self.sessions: list[AsyncSession] = []
        self.waiters: list[asyncio.Future[None]] = []
        self._by_sid: dict[str, AsyncSession] = {}
        self._buffer: list[dict[str, Any]] = []
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "syncing" if self.syncing else "live"
        return (
            f"<Replica {self.repo!r} epoch={self.epoch} applied={self.applied} "
            f"sessions={len(self.sessions)} {state}>"
        )

    def attach(self, session: AsyncSession) -> None:
        """Feed ``session`` from now on; a replica never synced starts now."""
        self.sessions.append(session)
        self._by_sid[session.sid] = session
        if self._task is None:
            self.epoch = session.epoch
            self._task = self.connection.loop.create_task(self._repair_loop())
            self.want_repair()
        elif session.epoch != self.epoch:
            # Joined in an epoch the replica has not seen: the broker restarted.
            self.want_repair()

    def detach(self, session: AsyncSession) -> None:
        """Stop feeding ``session``; the replica closes with its last session."""
        if session in self.sessions:
            self.sessions.remove(session)
        if self._by_sid.get(session.sid) is session:
            del self._by_sid[session.sid]
            for other in self.sessions:
                if other.sid == session.sid:
                    self._by_sid[other.sid] = other
        if not self.sessions:
            self.close()

    def close(self) -> None:
        """Stop repairing; the replica is no longer fed."""
        if self._task is not None and not self.connection.loop.is_closed():
            self._task.cancel()
        self.connection.forget(self)

    # -- repair ---------------------------------------------------------------

    def want_repair(self) -> None:
        """Start over from a snapshot; events are buffered until it is in."""
        self.syncing = True
        self._wanted.set()

    async def _repair_loop(self) -> None:
        while self.sessions:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self._sync()
            except SessionClosed:
                if self.connection.closed:
                    return
                self.want_repair()
            except FleetbusError as exc:
                _log().warning("repair.failed", repo=self.repo, error=str(exc))
                self.want_repair()
                await asyncio.sleep(_REPAIR_BACKOFF_S)

    async def _sync(self) -> None:
        """Let sessions join again if they must, then load one snapshot."""
        self.syncing = True
        sessions = list(self.sessions)
        if not sessions:
            return
        rejoined = await asyncio.gather(
            *(session._rejoin_if_wanted() for session in sessions),
            return_exceptions=True,
        )
        refused = _refused(sessions, rejoined)
        snapshot = await self._snapshot(sessions)
        epoch = snapshot.get("epoch")
        for session in refused:
            # It tries again through its own heartbeats (``_lost``), and
            # asks for a snapshot once it is back.
            session._refused_in = epoch
        stale = [s for s in self.sessions if s.epoch != epoch and s not in refused]
        if stale:
            for session in stale:
                session._rejoin = True
            self.want_repair()
            return
        self._load(snapshot, int(epoch))  # type: ignore[arg-type]

    async def _snapshot(self, sessions: list[AsyncSession]) -> dict[str, Any]:
        message = {
            "op": "snapshot",
            "rid": sessions[0]._new_rid(),
            "repo": self.repo,
            # Rows as claim_groups: a fifth of the bytes, loaded several times faster.
            "compact": True,
        }
        limit = max(session.timeout for session in sessions)
        reply = await self.connection.exchange(message, self, limit)
        if not reply.get("ok"):
            raise error_from_wire(reply.get("error") or {})
        return reply

    def _load(self, snapshot: dict[str, Any], epoch: int) -> None:
        self.synced_once = True
        self.epoch = epoch
        with self.lock:
            self.view.load(snapshot)
            self.applied = int(snapshot["head"])
            for session in self.sessions:
                session._own.prune(self.view, self.applied)
        self.syncing = False
        buffered, self._buffer = self._buffer, []
        for event in buffered:
            if not self._apply(event):
                break
        self._wake()
        _log().debug("replica.synced", repo=self.repo, head=self.applied)
        notice = {"type": "resync", "epoch": epoch, "head": self.applied}
        for session in list(self.sessions):
            if session._synced_once:
                session._emit(dict(notice))
            session._synced_once = True

    # -- events ---------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        """Take one event of the claims stream (or a broker heartbeat)."""
        if event.get("type") == "heartbeat":
            self._on_heartbeat(event)
            return
        if self.syncing:
            if len(self._buffer) >= _MAX_BUFFER:
                self._buffer.clear()
            self._buffer.append(event)
            return
        self._apply(event)

    def _on_heartbeat(self, event: dict[str, Any]) -> None:
        head = event.get("head")
        epoch = event.get("epoch")
        stale = [
            s for s in self.sessions if s.epoch != epoch and s._refused_in != epoch
        ]
        if epoch != self.epoch or stale:
            for session in stale:
                session._rejoin = True
            if not self.syncing:
                # A repair under way checks every session against its
                # snapshot's epoch: asking again would load a second snapshot.
                self.want_repair()
        elif not self.syncing and isinstance(head, int) and head > self.applied:
            self.want_repair()
        else:
            for session in list(self.sessions):
                session._facts_on_heartbeat(event)

    def _apply(self, event: dict[str, Any]) -> bool:
        """Apply one event in order; False (and a resync) on a gap."""
        seq = event.get("seq")
        if not isinstance(seq, int) or seq <= self.applied:
            return True
        if event.get("prev") != self.applied:
            _log().info(
                "replica.gap", repo=self.repo, applied=self.applied, prev=event["prev"]
            )
            self.want_repair()
            return False
        owner = self._by_sid.get(event.get("sid"))  # type: ignore[arg-type]
        with self.lock:
            self.view.apply(event)
            self.applied = seq
            if owner is not None and owner._own:
                owner._own.prune(self.view, seq)
        if self.waiters:
            self._wake()
        for session in self.sessions:
            if session._queues or session._callbacks:
                session._emit(event)
        return True

    # -- waiting --------------------------------------------------------------

    async def wait(
        self,
        done: Callable[[], bool],
        timeout: float,
        failure: Callable[[], str],
        mine: list[asyncio.Future[None]],
    ) -> None:
        """Wait until the replica is live and ``done()``; TimedOut after ``timeout``.

        Each wait is also listed in ``mine``, so that its session can end it.
        """
        loop = self.connection.loop
        deadline = loop.time() + timeout
        while self.syncing or not done():
            waiter: asyncio.Future[None] = loop.create_future()
            self.waiters.append(waiter)
            mine.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise TimedOut(failure()) from None
            finally:
                for waiting in (self.waiters, mine):
                    if waiter in waiting:
                        waiting.remove(waiter)

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _refused(
    sessions: list[AsyncSession], outcomes: list[BaseException | None]
) -> set[AsyncSession]:
    """The sessions the broker would not take back, from their rejoins.

    Such a session tries again at its next heartbeat; the others need not
    wait for it. A broker that did not answer fails the whole repair.
    """
    refused: set[AsyncSession] = set()
    for session, outcome in zip(sessions, outcomes, strict=True):
        if outcome is None or isinstance(outcome, SessionClosed):
            continue
        transient = isinstance(outcome, BrokerUnavailable | TimedOut)
        if transient or not isinstance(outcome, FleetbusError):
            raise outcome
        _log().warning("rejoin.failed", sid=session.sid, error=str(outcome))
        refused.add(session)
    return refused


# -- the registry of connections ---------------------------------------------------

_connections: dict[tuple[Any, ...], Connection] = {}


def connection_for(url: str) -> Connection:
    """The open connection to ``url`` on the running loop, or a new one.

    Sessions share a connection only when they would present the same
    credentials: the CURVE keys named by the environment are part of the key.
    """
    loop = asyncio.get_running_loop()
    key = (
        os.getpid(),
        id(loop),
        url,
        os.environ.get(SERVER_KEY_ENV),
        os.environ.get(CLIENT_KEY_ENV),
    )
    for stale in [k for k, c in _connections.items() if c.loop.is_closed()]:
        _connections.pop(stale).close()
    found = _connections.get(key)
    if found is not None and not found.closed and found.loop is loop:
        return found
    connection = Connection(key, url)
    _connections[key] = connection
    return connection


def _forget(connection: Connection) -> None:
    if _connections.get(connection.key) is connection:
        del _connections[connection.key]


def open_connections() -> list[Connection]:
    """The connections open in this process, on live loops (for diagnostics)."""
    return [c for c in _connections.values() if not c.loop.is_closed()]
