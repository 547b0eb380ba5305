"""A session of the fleet: joins, keeps a replica of the claims, claims, releases.

:class:`AsyncSession` is the core, on asyncio. It joins with ``hello``, keeps
its lease with heartbeats, and reads a local replica of its repository's claim
table so that "may I edit this path?" needs no round trip. The replica follows
the claims stream event by event; a gap, or a broker that restarted (a new
epoch), makes it start over from a snapshot.

Sessions of one process on one event loop that reach the same broker share
one connection (see :mod:`fleetbus.client.connection`): one pair of sockets,
each event decoded once, and one replica per repository, applied once per
event. Each session still has its own sid, lease, grants and listeners.

:class:`Session` offers the same methods, blocking, by running the core on an
event-loop thread that every blocking session of the process shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import secrets
import socket
import threading
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fleetbus import log
from fleetbus.claims import Claim, SessionInfo
from fleetbus.client.connection import (
    Connection,
    Replica,
    SessionClosed,
    connection_for,
)
from fleetbus.client.facts import FactsMixin, SyncFactsMixin, queue_stream
from fleetbus.client.overlay import OwnChanges
from fleetbus.errors import (
    BadInput,
    FleetbusError,
    TimedOut,
    UnknownSession,
    error_from_wire,
)
from fleetbus.paths import resolve_url
from fleetbus.repo import RepoInfo, discover, repo_path, resolve_scope


def _log() -> Any:
    # Bound when used, not at import, so that a later log.configure() applies.
    return log.get("fleetbus.client")


T = TypeVar("T")
EventCallback = Callable[[dict[str, Any]], None]

_LEAVE_TIMEOUT_S = 1.0
_REPAIR_BACKOFF_S = 0.2
# How long a session waits for an event the broker already holds before it
# loads a snapshot instead.
_CATCH_UP_GRACE_S = 0.25
_UNKEYED_OPS = frozenset({"ping", "status", "snapshot", "unbind"})

__all__ = [
    "AsyncSession",
    "EventCallback",
    "Grant",
    "Session",
    "SessionClosed",
    "connect",
    "default_meta",
]


@dataclass(frozen=True)
class Grant:
    """A granted claim: its id, its fencing token and the claim rows."""

    id: str
    fence: int
    claims: list[Claim]


def default_meta(repo: RepoInfo) -> dict[str, Any]:
    """What a session tells the broker about itself unless told otherwise."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": getpass.getuser(),
        "worktree": str(repo.root),
        "branch": repo.branch,
    }


class AsyncSession(FactsMixin):
    """One session of the fleet, on asyncio; build one with :meth:`connect`."""

    sid: str
    name: str
    repo: RepoInfo
    epoch: int

    def __init__(
        self,
        connection: Connection,
        repo: RepoInfo,
        *,
        sid: str,
        name: str,
        leased: bool,
        meta: dict[str, Any],
        timeout: float,
        replica: bool,
        join: bool = True,
    ) -> None:
        self.sid = sid
        self.name = name
        self.repo = repo
        self.epoch = 0
        self.leased = leased and join
        self.joins = join
        self.meta = meta
        self.timeout = timeout
        self.lease_ms = 0
        self.heartbeat_ms = 0
        self._connection = connection
        self._transport = connection.transport
        self.url = connection.url
        self._replica = replica
        # The replica this session reads: shared with the other sessions of
        # its repository on the connection, or a detached empty one.
        self._shared = Replica(connection, repo.id)
        self._own = OwnChanges()
        self._synced_once = False
        self._join_head: int | None = None
        self._rid_prefix = secrets.token_hex(6) + "-"
        self._rid_count = 0
        self._generation = 0
        self._rejoin = False
        self._rejoin_lock = asyncio.Lock()
        self._repair_wanted = asyncio.Event()
        self._synced_waiters: list[asyncio.Future[None]] = []
        self._queues: list[asyncio.Queue[dict[str, Any] | None]] = []
        self._callbacks: list[EventCallback] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeats: asyncio.Task[None] | None = None
        # Whether this session holds a subscription to its claims stream.
        self._following = False
        # The broker epoch in which the broker refused to take the session back.
        self._refused_in: object = None
        # The generation whose loss the listeners were told of.
        self._told_lost = 0
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("syncing" if self._syncing else "live")
        return (
            f"<AsyncSession {self.sid!r} repo={self.repo.id!r} epoch={self.epoch} "
            f"applied={self.applied} {state}>"
        )

    @property
    def _syncing(self) -> bool:
        return self._shared.syncing

    # -- lifecycle ------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        *,
        repo: str | Path | RepoInfo | None = None,
        session_id: str | None = None,
        name: str | None = None,
        leased: bool = True,
        meta: dict[str, Any] | None = None,
        timeout: float = 5.0,
        replica: bool = True,
        join: bool = True,
    ) -> AsyncSession:
        """Join the fleet of ``repo`` (default: the cwd's) at the broker ``url``.

        ``leased=False`` attaches without a lease, for short-lived commands
        whose claims carry a TTL. ``replica=False`` skips the claim replica:
        :meth:`holders`, :meth:`may_edit` and :meth:`events` then have nothing.
        ``join=False`` watches without joining: no lease, no claims, but the
        replica, events and queries work.
        Raises :class:`BrokerUnavailable` when the broker does not answer
        within ``timeout`` seconds.
        """
        info = repo if isinstance(repo, RepoInfo) else discover(repo)
        sid = session_id or f"s-{secrets.token_hex(8)}"
        session = cls(
            connection_for(resolve_url(url)),
            info,
            sid=sid,
            name=name or sid,
            leased=leased,
            meta={**default_meta(info), **(meta or {})},
            timeout=timeout,
            replica=replica,
            join=join,
        )
        try:
            await session._start()
        except BaseException:
            await session.close(leave=False)
            raise
        return session

    async def _start(self) -> None:
        self._connection.attach(self)
        if self._replica:
            self._connection.follow(self.repo.id)
            self._following = True
        await self._join()
        if self._replica:
            self._shared = self._connection.replica(self.repo.id)
        else:
            self._spawn(self._repair_loop())
        # The lease runs from the join on: beat while the replica catches up.
        if self.leased:
            self._heartbeats = self._task(self._heartbeat())
        if self._replica:
            await self._follow_replica()

    async def _follow_replica(self) -> None:
        """Wait until the shared replica has applied this session's join."""
        self._shared.attach(self)
        head = self._join_head
        if head is not None:
            await self._catch_up(head, self.timeout)
        else:
            await self._shared.wait(
                lambda: True,
                self.timeout,
                lambda: "the replica did not load in time",
                self._synced_waiters,
            )
        self._synced_once = True

    async def _catch_up(self, head: int, timeout: float) -> None:
        """Wait until the replica has applied ``head``, which the broker holds.

        A replica already live serves at once, once that event is in. The
        event can be lost: a subscription the broker has not seen yet drops
        what it publishes. After a short grace the replica starts over from a
        snapshot, instead of waiting for the broker's next heartbeat.
        """
        shared = self._shared

        def reached() -> bool:
            return shared.applied >= head

        def failure() -> str:
            return f"the replica reached seq {shared.applied}, not {head}, in time"

        grace = min(timeout, _CATCH_UP_GRACE_S)
        try:
            await shared.wait(reached, grace, failure, self._synced_waiters)
        except TimedOut:
            if not shared.syncing:
                shared.want_repair()
            await shared.wait(reached, timeout - grace, failure, self._synced_waiters)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._task(coro)

    def _task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` until the session closes; the task, to stop it sooner."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, *, leave: bool = True) -> None:
        """Leave the fleet (unless ``leave=False``) and close every socket.

        Leaving releases the session's lease-bound claims at once; without it
        they stay until the lease runs out. Claims with a TTL stay either way.
        Other sessions sharing this session's connection keep it; the last
        one to close closes the sockets.
        """
        if self._closed:
            return
        await self._stop_heartbeat()
        if leave and self.joins and self._generation:
            with contextlib.suppress(FleetbusError):
                await self._request("leave", timeout=_LEAVE_TIMEOUT_S)
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._following:
            self._following = False
            self._connection.unfollow(self.repo.id)
        self._facts_close()
        if self._replica:
            self._shared.detach(self)
        self._connection.detach(self)
        for queue in self._queues:
            queue.put_nowait(None)
        for waiter in self._synced_waiters:
            if not waiter.done():
                waiter.set_exception(SessionClosed("the session was closed"))

    async def _stop_heartbeat(self) -> None:
        """End the heartbeat loop, so that no beat follows the ``leave``.

        A beat the broker received after the leave would be answered "unknown
        session" and make the session join again, or warn, while closing.
        """
        task, self._heartbeats = self._heartbeats, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- claims ---------------------------------------------------------------

    async def claim(
        self,
        *scopes: str,
        shared: bool = False,
        intent: str = "",
        ttl: float | None = None,
        wait: float | None = None,
    ) -> Grant:
        """Claim every one of ``scopes``, all or nothing.

        ``shared`` claims coexist with other shared claims; ``ttl`` (seconds)
        makes the claim outlive the session's lease; ``wait`` (seconds) queues
        behind the holders instead of being refused at once. Raises
        :class:`Conflict`, :class:`Deadlock`, :class:`TimedOut` (the wait ran
        out) or :class:`BadScope`. Cancelling the call withdraws the request at
        the broker: it leaves the queue, or a grant that came meanwhile is
        released.
        """
        if not scopes:
            raise BadInput("a claim needs at least one scope")
        repo = self.repo
        message: dict[str, Any] = {
            "op": "claim",
            "rid": self._new_rid(),
            "sid": self.sid,
            "scopes": [resolve_scope(text, repo).text for text in scopes],
            "mode": "shared" if shared else "exclusive",
            "intent": intent,
        }
        if ttl is not None:
            message["ttl_ms"] = _millis(ttl, "ttl")
        if wait is not None:
            message["wait_ms"] = _millis(wait, "wait")
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            reply = await self._send(message, wait)
        except asyncio.CancelledError:
            await self._withdraw(message["rid"])
            raise
        if task is not None and task.cancelling() > cancels:
            # A cancel that came with the reply: the caller gave up, so the
            # grant goes back.
            await self._withdraw(message["rid"])
            raise asyncio.CancelledError
        rows = [Claim.from_wire(row) for row in reply.get("claims", ())]
        grant = Grant(id=str(reply["grant"]), fence=int(reply["fence"]), claims=rows)
        if self._replica:
            replica = self._shared
            with replica.lock:
                self._own.granted(rows, replica.applied)
        return grant

    async def _withdraw(self, rid: str) -> None:
        """Withdraw, at the broker, a claim request that was cancelled here.

        Its wait ends, or what it was granted meanwhile is released, so that
        nothing stays held for a caller that gave up.
        """
        if self._closed:
            return
        with contextlib.suppress(FleetbusError):
            await self._request("cancel", wait=rid, timeout=_LEAVE_TIMEOUT_S)

    @contextlib.asynccontextmanager
    async def claiming(
        self,
        *scopes: str,
        shared: bool = False,
        intent: str = "",
        ttl: float | None = None,
        wait: float | None = None,
    ) -> AsyncIterator[Grant]:
        """Claim ``scopes`` for the ``async with`` block; release on the way out."""
        grant = await self.claim(
            *scopes, shared=shared, intent=intent, ttl=ttl, wait=wait
        )
        try:
            yield grant
        finally:
            if not self._closed:
                await self.release(grant=grant.id)

    async def release(
        self, *scopes: str, grant: str | None = None, all: bool = False
    ) -> list[str]:
        """Release the claims on ``scopes``, of one ``grant``, or ``all`` of them.

        Returns the ids of the released claims. Raises :class:`NotOwner` for a
        claim held by another session.
        """
        message: dict[str, Any] = {
            "op": "release",
            "rid": self._new_rid(),
            "sid": self.sid,
        }
        if all:
            message["all"] = True
        elif grant is not None:
            message["grant"] = grant
        elif scopes:
            message["scopes"] = [resolve_scope(s, self.repo).text for s in scopes]
        else:
            raise BadInput("say what to release: scopes, a grant, or all")
        reply = await self._send(message, None)
        released = [str(i) for i in reply.get("released", ())]
        if self._replica and released:
            shared = self._shared
            with shared.lock:
                self._own.released(released, shared.view)
                self._own.prune(shared.view, shared.applied)
        return released

    async def force_release(
        self, *scopes: str, ids: list[str] | None = None
    ) -> list[str]:
        """Release the claims on ``scopes``, or with ``ids``, whoever holds them.

        For operators: the broker decides who is one (see ``docs/security.md``)
        and raises :class:`NotAuthorised` for anyone else. The release is
        logged with this session's name as its author and published as
        ``claim.released`` with reason ``forced``. Returns the released ids.
        """
        fields: dict[str, Any] = {"repo": self.repo.id, "by": self.name}
        if scopes:
            fields["scopes"] = [resolve_scope(s, self.repo).text for s in scopes]
        if ids is not None:
            fields["ids"] = list(ids)
        if not scopes and ids is None:
            raise BadInput("say what to force-release: scopes or ids")
        reply = await self._request("force_release", **fields)
        return [str(i) for i in reply.get("released", [])]

    async def unbind(self, sid: str) -> bool:
        """Free the session id ``sid`` from the credential that opened it.

        For operators, under CURVE: the next credential to open ``sid`` owns
        it, with its claims and facts (a client whose key was replaced needs
        this to act as its old session ids). Raises :class:`NotAuthorised` for
        anyone else and :class:`BadInput` for an id bound to no credential.
        Returns whether the session is live at the broker.
        """
        reply = await self._request("unbind", target=sid, by=self.name)
        return bool(reply.get("live"))

    async def renew(self, grant: str, ttl: float) -> None:
        """Give the claims of ``grant`` a new TTL of ``ttl`` seconds from now."""
        await self._request("renew", grant=grant, ttl_ms=_millis(ttl, "ttl"))

    async def snapshot(self) -> dict[str, Any]:
        """The broker's claim table of this repository, as of now."""
        return await self._request("snapshot", repo=self.repo.id)

    async def status(self) -> dict[str, Any]:
        """The broker's figures: epoch, version, and per repository counts."""
        return await self._request("status", repo=self.repo.id)

    # -- the local replica ----------------------------------------------------
    #
    # Reads merge the session's own changes known from replies (OwnChanges)
    # until their events reach the replica: read-your-writes without a wait.

    def holders(self, path: str) -> list[Claim]:
        """The claims whose scope matches ``path``, from the local replica."""
        target = repo_path(path, self.repo)
        shared = self._shared
        with shared.lock:
            rows = list(shared.view.holders(target))
            return self._merged(rows, target) if self._own else rows

    def may_edit(self, path: str) -> bool:
        """Whether this session may edit ``path``, from the local replica."""
        target = repo_path(path, self.repo)
        shared = self._shared
        with shared.lock:
            return bool(shared.view.may_edit(target, self.sid))

    def claims(self, *, mine: bool = False) -> list[Claim]:
        """Every claim in the replica, or only this session's."""
        shared = self._shared
        with shared.lock:
            rows = list(shared.view.claims(self.sid if mine else None))
            return self._merged(rows) if self._own else rows

    def _merged(self, rows: list[Claim], path: str | None = None) -> list[Claim]:
        """``rows`` with this session's own changes; the replica's lock is held."""
        shared = self._shared
        self._own.prune(shared.view, shared.applied)
        return self._own.merge(rows, path)

    @property
    def sessions(self) -> dict[str, SessionInfo]:
        """The sessions of the fleet as the replica knows them, by sid."""
        shared = self._shared
        with shared.lock:
            return dict(shared.view.sessions)

    def view_snapshot(self) -> dict[str, Any]:
        """The replica's state, in the shape of a ``snapshot`` reply."""
        shared = self._shared
        with shared.lock:
            state: dict[str, Any] = shared.view.snapshot()
            head = shared.applied
        return {**state, "head": head, "epoch": self.epoch}

    @property
    def replied_at(self) -> float:
        """When the broker last answered on this session's connection, any
        session's request, on the event loop's clock (``loop.time()``); 0 if
        it never has."""
        return self._connection.replied_at

    @property
    def applied(self) -> int:
        """The ``seq`` of the last claims-stream event applied to the replica."""
        return self._shared.applied

    async def wait_synced(
        self, seq: int | None = None, *, timeout: float | None = None
    ) -> None:
        """Wait until the replica has applied every event up to ``seq``.

        Without ``seq``, up to the broker's head as of this call (one round
        trip). Raises :class:`TimedOut` after ``timeout`` (default: the
        session's request timeout).
        """
        if not self._replica:
            raise BadInput("this session keeps no replica")
        if seq is None:
            if self.joins:
                reply = await self._request("heartbeat")
            else:
                reply = await self._request("snapshot", repo=self.repo.id)
            self._check_epoch(reply)
            seq = int(reply["head"])
            await self._catch_up(seq, self.timeout if timeout is None else timeout)
            return
        target = seq
        shared = self._shared
        await shared.wait(
            lambda: shared.applied >= target,
            self.timeout if timeout is None else timeout,
            lambda: f"replica reached seq {shared.applied}, not {target}, in time",
            self._synced_waiters,
        )

    # -- events ---------------------------------------------------------------

    def events(self) -> AsyncIterator[dict[str, Any]]:
        """Claims-stream events as the replica applies them, from now on.

        Besides the broker's events come two notices of the session's own:
        ``{"type": "resync"}`` after the replica started over from a snapshot,
        and ``{"type": "session.lost"}`` when the broker had dropped this
        session (its lease-bound claims are gone) and it joined again. The
        iterator ends when the session closes.
        """
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._queues.append(queue)
        return queue_stream(self._queues, queue)

    def on_event(self, callback: EventCallback) -> None:
        """Call ``callback(event)`` for every event :meth:`events` would yield.

        The callback runs on the session's event loop and must not block.
        """
        self._callbacks.append(callback)

    def _emit(self, event: dict[str, Any]) -> None:
        for queue in self._queues:
            queue.put_nowait(event)
        for callback in self._callbacks:
            try:
                callback(event)
            except Exception:
                _log().exception("callback.failed", sid=self.sid)

    # -- requests -------------------------------------------------------------

    async def _request(
        self,
        op: str,
        *,
        patience: float | None = None,
        timeout: float | None = None,
        rid: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send one request and return its reply, retrying with the same rid.

        ``patience`` is how long the broker may keep a queued request before
        its final reply. A reply saying the broker forgot this session (the
        lease ran out) makes the session join again, then the request is sent
        once more.
        """
        message = {"op": op, "rid": rid or self._new_rid(), **fields}
        if op not in _UNKEYED_OPS:
            message["sid"] = self.sid
        return await self._send(message, patience, timeout)

    async def _send(
        self,
        message: dict[str, Any],
        patience: float | None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """:meth:`_request` for a message already built."""
        if self._closed:
            raise SessionClosed("the session is closed")
        generation = self._generation
        limit = self.timeout if timeout is None else timeout
        reply = await self._connection.exchange(message, self, limit, patience)
        if reply.get("ok"):
            return reply
        error = error_from_wire(reply.get("error") or {})
        if (
            not isinstance(error, UnknownSession)
            or message["op"] in ("hello", "leave")
            or self._closed
            or not self.joins
        ):
            raise error
        await self._lost(generation)
        return await self._exchange(message, patience, timeout)

    def _new_rid(self) -> str:
        self._rid_count += 1
        return f"{self._rid_prefix}{self._rid_count}"

    async def _exchange(
        self,
        message: dict[str, Any],
        patience: float | None,
        timeout: float | None,
    ) -> dict[str, Any]:
        if self._closed:
            raise SessionClosed("the session is closed")
        limit = self.timeout if timeout is None else timeout
        reply = await self._connection.exchange(message, self, limit, patience)
        if reply.get("ok"):
            return reply
        raise error_from_wire(reply.get("error") or {})

    # -- joining, leases, recovery --------------------------------------------

    async def _join(self) -> None:
        if self.joins:
            reply = await self._request(
                "hello",
                repo=self.repo.id,
                name=self.name,
                meta=self.meta,
                lease=self.leased,
            )
        else:
            reply = await self._request("status", repo=self.repo.id)
        self.epoch = int(reply["epoch"])
        self.lease_ms = int(reply.get("lease_ms", 5000))
        self.heartbeat_ms = int(reply.get("heartbeat_ms", self.lease_ms // 3))
        head = reply.get("head")
        self._join_head = head if isinstance(head, int) else None
        if self._replica:
            self._transport.attach_events(reply["pub"])
        self._generation += 1
        _log().debug("session.joined", sid=self.sid, epoch=self.epoch)

    async def _lost(self, generation: int) -> None:
        """The broker forgot us: say so, then join again (once for all callers)."""
        async with self._rejoin_lock:
            if generation != self._generation:
                return
            if self._told_lost != generation:
                # Once per loss, however many requests find it out while
                # the broker refuses to take the session back.
                self._told_lost = generation
                _log().warning("session.lost", sid=self.sid, epoch=self.epoch)
                self._emit(
                    {"type": "session.lost", "sid": self.sid, "reason": "unknown"}
                )
            await self._join()
        self._connection.resend_queued(self)
        self._want_repair()

    async def _rejoin_if_wanted(self) -> None:
        """Join again if a new broker epoch asked for it; re-send queued claims."""
        if self._closed:
            return
        async with self._rejoin_lock:
            if not self._rejoin:
                return
            await self._join()
            self._rejoin = False
        self._connection.resend_queued(self)

    async def _heartbeat(self) -> None:
        # Ends on its own once stopped too: on Python 3.11 a cancellation that
        # meets a reply inside wait_for can be lost, and close() would hang.
        while not self._closed and self._heartbeats is not None:
            await asyncio.sleep(self.heartbeat_ms / 1000)
            try:
                reply = await self._request("heartbeat")
            except SessionClosed:
                return
            except FleetbusError as exc:
                _log().warning("heartbeat.failed", sid=self.sid, error=str(exc))
                continue
            self._check_epoch(reply)

    def _check_epoch(self, reply: dict[str, Any]) -> None:
        epoch = reply.get("epoch")
        if not isinstance(epoch, int) or epoch == self.epoch:
            return
        if self._replica and self._shared.syncing:
            # The replica's repair under way joins again whoever its snapshot
            # finds behind; asking for another would load a second snapshot.
            return
        if epoch == self._refused_in:
            # This broker refused to take the session back: ask again, and
            # load a snapshot only once it has.
            self._spawn(self._retry_rejoin())
        else:
            self._want_repair(rejoin=True)

    async def _retry_rejoin(self) -> None:
        self._rejoin = True
        try:
            await self._rejoin_if_wanted()
        except FleetbusError as exc:
            _log().debug("rejoin.refused", sid=self.sid, error=str(exc))
            return
        self._refused_in = None
        self._want_repair()

    def _want_repair(self, *, rejoin: bool = False) -> None:
        """Start over from a snapshot, after joining again if ``rejoin``.

        The shared replica does both, for every session that follows it; a
        session without a replica only joins again.
        """
        if self._closed:
            return
        self._rejoin = self._rejoin or rejoin
        if self._replica:
            self._shared.want_repair()
        else:
            self._repair_wanted.set()

    async def _repair_loop(self) -> None:
        """Join again when asked, for a session that keeps no replica."""
        while not self._closed:
            await self._repair_wanted.wait()
            self._repair_wanted.clear()
            try:
                await self._rejoin_if_wanted()
            except SessionClosed:
                return
            except FleetbusError as exc:
                _log().warning("repair.failed", sid=self.sid, error=str(exc))
                self._want_repair()
                await asyncio.sleep(_REPAIR_BACKOFF_S)


def _millis(seconds: float, what: str) -> int:
    if seconds < 0:
        raise BadInput(f"{what} must not be negative", field=what)
    return round(seconds * 1000)


class _LoopThread:
    """An event loop running on a daemon thread, driven from other threads.

    Blocking sessions of one process share one (see :meth:`acquire`), and so
    share one connection per broker too.
    """

    _shared: _LoopThread | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.users = 0
        self.pid = os.getpid()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="fleetbus-session", daemon=True
        )
        self._thread.start()

    @classmethod
    def acquire(cls) -> _LoopThread:
        """The process's shared loop thread, started if none runs; count a user."""
        with cls._shared_lock:
            runner = cls._shared
            if runner is None or runner.pid != os.getpid() or runner.loop.is_closed():
                runner = cls._shared = cls()
            runner.users += 1
            return runner

    def release(self) -> None:
        """One user fewer; the last one stops the loop and its thread."""
        with self._shared_lock:
            self.users -= 1
            if self.users > 0:
                return
            if _LoopThread._shared is self:
                _LoopThread._shared = None
        self.stop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C in the calling thread cancels the call on the loop too.
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Handover:
    """A grant passed from the loop thread to a caller that may have gone.

    Whichever side comes second gives the grant back: the loop when the
    caller was interrupted first, the caller when the grant was already out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._grant: Grant | None = None

    def deliver(self, grant: Grant) -> bool:
        """Hand ``grant`` over; False if the caller has already gone."""
        with self._lock:
            if self._abandoned:
                return False
            self._grant = grant
            return True

    def abandon(self) -> Grant | None:
        """The caller goes; returns the grant handed over before, if any."""
        with self._lock:
            self._abandoned = True
            return self._grant


async def _give_back(core: AsyncSession, grant: Grant) -> None:
    """Release a grant nobody holds any more; the broker may be gone too."""
    with contextlib.suppress(FleetbusError):
        await core.release(grant=grant.id)


class Session(SyncFactsMixin):
    """The blocking form of :class:`AsyncSession`; build one with :func:`connect`.

    An event-loop thread, shared by the blocking sessions of the process, runs
    the core; every method blocks until the core has done its part. Replica
    reads (:meth:`holders`, :meth:`may_edit`, :meth:`claims`) do not cross
    threads.
    """

    _core: AsyncSession
    _runner: _LoopThread

    def __init__(self, core: AsyncSession, runner: _LoopThread) -> None:
        self._core = core
        self._runner = runner
        self._closed = False

    @classmethod
    def connect(cls, url: str | None = None, **options: Any) -> Session:
        """Join the fleet; takes the arguments of :meth:`AsyncSession.connect`."""
        runner = _LoopThread.acquire()
        try:
            core = runner.run(AsyncSession.connect(url, **options))
        except BaseException:
            runner.release()
            raise
        return cls(core, runner)

    def __repr__(self) -> str:
        return f"<Session {self._core!r}>"

    @property
    def sid(self) -> str:
        """The session id."""
        return self._core.sid

    @property
    def name(self) -> str:
        """The name other sessions see."""
        return self._core.name

    @property
    def repo(self) -> RepoInfo:
        """The repository this session works on."""
        return self._core.repo

    @property
    def epoch(self) -> int:
        """The broker epoch the session last joined in."""
        return self._core.epoch

    @property
    def core(self) -> AsyncSession:
        """The asyncio session underneath."""
        return self._core

    def claim(self, *scopes: str, **options: Any) -> Grant:
        """See :meth:`AsyncSession.claim`.

        An interrupted call (Ctrl-C) gives back a grant that came meanwhile,
        even one that arrived just before the interruption.
        """
        handover = _Handover()
        try:
            return self._runner.run(self._claim(handover, scopes, options))
        except BaseException:
            grant = handover.abandon()
            if grant is not None:
                self._runner.loop.call_soon_threadsafe(
                    self._core._spawn, _give_back(self._core, grant)
                )
            raise

    async def _claim(
        self, handover: _Handover, scopes: tuple[str, ...], options: dict[str, Any]
    ) -> Grant:
        grant = await self._core.claim(*scopes, **options)
        if handover.deliver(grant):
            return grant
        await _give_back(self._core, grant)
        raise asyncio.CancelledError

    @contextlib.contextmanager
    def claiming(self, *scopes: str, **options: Any) -> Iterator[Grant]:
        """Claim ``scopes`` for the ``with`` block; release on the way out."""
        grant = self.claim(*scopes, **options)
        try:
            yield grant
        finally:
            self.release(grant=grant.id)

    def release(
        self, *scopes: str, grant: str | None = None, all: bool = False
    ) -> list[str]:
        """See :meth:`AsyncSession.release`."""
        return self._runner.run(self._core.release(*scopes, grant=grant, all=all))

    def force_release(self, *scopes: str, ids: list[str] | None = None) -> list[str]:
        """See :meth:`AsyncSession.force_release`."""
        return self._runner.run(self._core.force_release(*scopes, ids=ids))

    def unbind(self, sid: str) -> bool:
        """See :meth:`AsyncSession.unbind`."""
        return self._runner.run(self._core.unbind(sid))

    def renew(self, grant: str, ttl: float) -> None:
        """See :meth:`AsyncSession.renew`."""
        self._runner.run(self._core.renew(grant, ttl))

    def snapshot(self) -> dict[str, Any]:
        """See :meth:`AsyncSession.snapshot`."""
        return self._runner.run(self._core.snapshot())

    def status(self) -> dict[str, Any]:
        """See :meth:`AsyncSession.status`."""
        return self._runner.run(self._core.status())

    def holders(self, path: str) -> list[Claim]:
        """See :meth:`AsyncSession.holders`."""
        return self._core.holders(path)

    def may_edit(self, path: str) -> bool:
        """See :meth:`AsyncSession.may_edit`."""
        return self._core.may_edit(path)

    def claims(self, *, mine: bool = False) -> list[Claim]:
        """See :meth:`AsyncSession.claims`."""
        return self._core.claims(mine=mine)

    def wait_synced(
        self, seq: int | None = None, *, timeout: float | None = None
    ) -> None:
        """See :meth:`AsyncSession.wait_synced`."""
        self._runner.run(self._core.wait_synced(seq, timeout=timeout))

    def on_event(self, callback: EventCallback) -> None:
        """See :meth:`AsyncSession.on_event`; the callback runs on the loop thread."""
        self._core.on_event(callback)

    def events(self) -> Iterator[dict[str, Any]]:
        """See :meth:`AsyncSession.events`; each step blocks for the next event."""
        stream = self._runner.run(_open_events(self._core))
        try:
            while True:
                try:
                    yield self._runner.run(_next_event(stream))
                except StopAsyncIteration:
                    return
        finally:
            if not self._runner.loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    self._runner.run(_close_events(stream))

    def close(self, *, leave: bool = True) -> None:
        """See :meth:`AsyncSession.close`; the last session ends the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(self._core.close(leave=leave))
        finally:
            self._runner.release()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _open_events(core: AsyncSession) -> AsyncIterator[dict[str, Any]]:
    return core.events()


async def _next_event(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    return await anext(stream)


async def _close_events(stream: AsyncIterator[dict[str, Any]]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def connect(url: str | None = None, **options: Any) -> Session:
    """Join the fleet with a blocking :class:`Session`.

    Takes the arguments of :meth:`AsyncSession.connect`.
    """
    return Session.connect(url, **options)
