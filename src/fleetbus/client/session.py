"""A session of the fleet: joins, keeps a replica of the claims, claims, releases.

:class:`AsyncSession` is the core, on asyncio. It joins with ``hello``, keeps
its lease with heartbeats, and keeps a local replica of its repository's claim
table so that "may I edit this path?" needs no round trip. The replica follows
the claims stream event by event; a gap, or a broker that restarted (a new
epoch), makes it start over from a snapshot.

:class:`Session` offers the same methods, blocking, by running one core on a
private event-loop thread.
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

from fleetbus import log, wire
from fleetbus.claims import Claim, ClaimView, SessionInfo
from fleetbus.client.facts import FactsMixin, SyncFactsMixin, queue_stream
from fleetbus.client.overlay import OwnChanges
from fleetbus.client.transport import Transport, open_transport
from fleetbus.errors import (
    BadInput,
    BrokerUnavailable,
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

# Retries of an unanswered request start fast (a lost message on a local
# socket is rare and cheap to repeat) and back off to once a second.
_FIRST_RETRY_S = 0.2
_MAX_RETRY_S = 1.0
_LEAVE_TIMEOUT_S = 1.0
_REPAIR_BACKOFF_S = 0.2
# Events buffered while a snapshot is on its way; beyond this the replica will
# start over anyway, so older ones are dropped.
_MAX_BUFFER = 100_000
_UNKEYED_OPS = frozenset({"ping", "status", "snapshot"})


class SessionClosed(FleetbusError):
    """The session was closed while, or before, a request was made."""

    code = "closed"


@dataclass(frozen=True)
class Grant:
    """A granted claim: its id, its fencing token and the claim rows."""

    id: str
    fence: int
    claims: list[Claim]


class _Pending:
    """A request waiting for its reply, kept for retries and re-sends."""

    __slots__ = ("deadline", "future", "message", "patience", "queued")

    def __init__(
        self, message: dict[str, Any], future: asyncio.Future[dict[str, Any]]
    ) -> None:
        self.message = message
        self.future = future
        self.queued = False
        self.deadline = 0.0
        self.patience = 0.0


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
        transport: Transport,
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
        self._transport = transport
        self.url = transport.url
        self._replica = replica
        self._view = ClaimView()
        self._own = OwnChanges()
        self._view_lock = threading.Lock()
        self._applied = 0
        self._syncing = True
        self._synced_once = False
        self._buffer: list[dict[str, Any]] = []
        self._pending: dict[str, _Pending] = {}
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
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("syncing" if self._syncing else "live")
        return (
            f"<AsyncSession {self.sid!r} repo={self.repo.id!r} epoch={self.epoch} "
            f"applied={self._applied} {state}>"
        )

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
            open_transport(resolve_url(url)),
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
        self._spawn(self._read_replies())
        await self._join()
        if self._replica:
            self._transport.subscribe(wire.claims_topic(self.repo.id))
            self._spawn(self._read_events())
            await self._sync()
        if self.leased:
            self._heartbeats = self._task(self._heartbeat())
        self._spawn(self._repair_loop())

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
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(SessionClosed("the session was closed"))
        self._transport.close()
        for queue in self._queues:
            queue.put_nowait(None)
        self._facts_close()
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
        fields: dict[str, Any] = {
            "scopes": [resolve_scope(text, self.repo).text for text in scopes],
            "mode": "shared" if shared else "exclusive",
            "intent": intent,
        }
        if ttl is not None:
            fields["ttl_ms"] = _millis(ttl, "ttl")
        if wait is not None:
            fields["wait_ms"] = _millis(wait, "wait")
        rid = self._new_rid()
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            reply = await self._request("claim", patience=wait, rid=rid, **fields)
        except asyncio.CancelledError:
            await self._withdraw(rid)
            raise
        if task is not None and task.cancelling() > cancels:
            # On Python 3.11 wait_for returns a reply that raced a cancel and
            # drops the cancel: the caller gave up, so the grant goes back.
            await self._withdraw(rid)
            raise asyncio.CancelledError
        grant = Grant(
            id=str(reply["grant"]),
            fence=int(reply["fence"]),
            claims=[Claim.from_wire(row) for row in reply.get("claims", [])],
        )
        if self._replica:
            with self._view_lock:
                self._own.granted(grant.claims, self._applied)
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
        fields: dict[str, Any]
        if all:
            fields = {"all": True}
        elif grant is not None:
            fields = {"grant": grant}
        elif scopes:
            fields = {"scopes": [resolve_scope(s, self.repo).text for s in scopes]}
        else:
            raise BadInput("say what to release: scopes, a grant, or all")
        reply = await self._request("release", **fields)
        released = [str(i) for i in reply.get("released", [])]
        if self._replica and released:
            with self._view_lock:
                self._own.released(released, self._view)
                self._own.prune(self._view, self._applied)
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
        with self._view_lock:
            return self._own.merge(list(self._view.holders(target)), target)

    def may_edit(self, path: str) -> bool:
        """Whether this session may edit ``path``, from the local replica."""
        target = repo_path(path, self.repo)
        with self._view_lock:
            return bool(self._view.may_edit(target, self.sid))

    def claims(self, *, mine: bool = False) -> list[Claim]:
        """Every claim in the replica, or only this session's."""
        with self._view_lock:
            return self._own.merge(list(self._view.claims(self.sid if mine else None)))

    @property
    def sessions(self) -> dict[str, SessionInfo]:
        """The sessions of the fleet as the replica knows them, by sid."""
        with self._view_lock:
            return dict(self._view.sessions)

    def view_snapshot(self) -> dict[str, Any]:
        """The replica's state, in the shape of a ``snapshot`` reply."""
        with self._view_lock:
            state: dict[str, Any] = self._view.snapshot()
        return {**state, "head": self._applied, "epoch": self.epoch}

    @property
    def applied(self) -> int:
        """The ``seq`` of the last claims-stream event applied to the replica."""
        return self._applied

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
        target = seq
        await self._wait_replica(
            lambda: self._applied >= target,
            self.timeout if timeout is None else timeout,
            lambda: f"replica reached seq {self._applied}, not {target}, in time",
        )

    async def _wait_replica(
        self, done: Callable[[], bool], timeout: float, failure: Callable[[], str]
    ) -> None:
        """Wait until the replica is live and ``done()``; TimedOut after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._syncing or not done():
            waiter: asyncio.Future[None] = loop.create_future()
            self._synced_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise TimedOut(failure()) from None
            finally:
                with contextlib.suppress(ValueError):
                    self._synced_waiters.remove(waiter)

    def _wake_synced(self) -> None:
        for waiter in self._synced_waiters:
            if not waiter.done():
                waiter.set_result(None)

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
        generation = self._generation
        try:
            return await self._exchange(message, patience, timeout)
        except UnknownSession:
            if op in ("hello", "leave") or self._closed or not self.joins:
                raise
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
        loop = asyncio.get_running_loop()
        rid = message["rid"]
        pending = _Pending(message, loop.create_future())
        limit = self.timeout if timeout is None else timeout
        pending.deadline = loop.time() + limit
        pending.patience = (patience or 0.0) + limit
        self._pending[rid] = pending
        delay = min(_FIRST_RETRY_S, limit)
        try:
            self._transport.send(message)
            while True:
                remaining = pending.deadline - loop.time()
                if remaining <= 0:
                    raise self._no_answer(pending, limit)
                step = remaining if pending.queued else min(delay, remaining)
                try:
                    reply = await asyncio.wait_for(asyncio.shield(pending.future), step)
                except TimeoutError:
                    if not pending.queued:
                        self._transport.send(message)
                        delay = min(delay * 2, _MAX_RETRY_S)
                    continue
                if reply.get("ok"):
                    return reply
                raise error_from_wire(reply.get("error") or {})
        finally:
            self._pending.pop(rid, None)

    def _no_answer(self, pending: _Pending, limit: float) -> FleetbusError:
        op = pending.message["op"]
        if pending.queued:
            return TimedOut(f"no final answer to a queued {op} from the broker")
        return BrokerUnavailable(
            f"no answer to {op} from the broker at {self._transport.url} "
            f"within {limit:g}s"
        )

    async def _read_replies(self) -> None:
        while True:
            for reply in await self._transport.replies():
                self._on_reply(reply)

    def _on_reply(self, reply: dict[str, Any]) -> None:
        pending = self._pending.get(reply.get("rid"))  # type: ignore[arg-type]
        if pending is None:
            if reply.get("rid") is None:
                _log().warning("reply.protocol_error", error=reply.get("error"))
            return
        if reply.get("ok") and reply.get("queued"):
            pending.queued = True
            loop = asyncio.get_running_loop()
            pending.deadline = loop.time() + pending.patience
            return
        if not pending.future.done():
            pending.future.set_result(reply)

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
        if self._replica:
            self._transport.attach_events(reply["pub"])
        self._generation += 1
        _log().debug("session.joined", sid=self.sid, epoch=self.epoch)

    async def _lost(self, generation: int) -> None:
        """The broker forgot us: say so, then join again (once for all callers)."""
        async with self._rejoin_lock:
            if generation != self._generation:
                return
            _log().warning("session.lost", sid=self.sid, epoch=self.epoch)
            self._emit({"type": "session.lost", "sid": self.sid, "reason": "unknown"})
            await self._join()
        self._resend_queued()
        self._want_repair()

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
        if isinstance(epoch, int) and epoch != self.epoch:
            self._want_repair(rejoin=True)

    def _want_repair(self, *, rejoin: bool = False) -> None:
        """Start over from a snapshot, after joining again if ``rejoin``."""
        self._syncing = True
        self._rejoin = self._rejoin or rejoin
        self._repair_wanted.set()

    async def _repair_loop(self) -> None:
        while not self._closed:
            await self._repair_wanted.wait()
            self._repair_wanted.clear()
            try:
                if self._rejoin:
                    self._rejoin = False
                    async with self._rejoin_lock:
                        await self._join()
                    self._resend_queued()
                if self._replica:
                    await self._sync()
            except SessionClosed:
                return
            except FleetbusError as exc:
                _log().warning("repair.failed", sid=self.sid, error=str(exc))
                self._want_repair()
                await asyncio.sleep(_REPAIR_BACKOFF_S)

    def _resend_queued(self) -> None:
        """A restarted broker gets our queued claims again, under their rids."""
        for pending in list(self._pending.values()):
            if pending.queued:
                self._transport.send(pending.message)

    async def _sync(self) -> None:
        """Load a snapshot, then apply what was buffered meanwhile."""
        self._syncing = True
        snapshot = await self._request("snapshot", repo=self.repo.id)
        if snapshot.get("epoch") != self.epoch:
            self._want_repair(rejoin=True)
            return
        first = not self._synced_once
        self._synced_once = True
        with self._view_lock:
            self._view.load(snapshot)
            self._applied = int(snapshot["head"])
            self._own.prune(self._view, self._applied)
        self._syncing = False
        buffered, self._buffer = self._buffer, []
        for event in buffered:
            if not self._apply(event):
                break
        self._wake_synced()
        _log().debug("replica.synced", sid=self.sid, head=self._applied)
        if not first:
            self._emit({"type": "resync", "epoch": self.epoch, "head": self._applied})

    async def _read_events(self) -> None:
        while True:
            for topic, event in await self._transport.events():
                if topic.startswith(wire.FACTS_KIND):
                    self._on_fact_event(topic, event)
                else:
                    self._on_event(event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "heartbeat":
            head = event.get("head")
            if event.get("epoch") != self.epoch:
                self._want_repair(rejoin=True)
            elif not self._syncing and isinstance(head, int) and head > self._applied:
                self._want_repair()
            else:
                self._facts_on_heartbeat(event)
            return
        if self._syncing:
            if len(self._buffer) >= _MAX_BUFFER:
                self._buffer.clear()
            self._buffer.append(event)
            return
        self._apply(event)

    def _apply(self, event: dict[str, Any]) -> bool:
        """Apply one event in order; False (and a resync) on a gap."""
        seq = event.get("seq")
        if not isinstance(seq, int) or seq <= self._applied:
            return True
        if event.get("prev") != self._applied:
            _log().info(
                "replica.gap", sid=self.sid, applied=self._applied, prev=event["prev"]
            )
            self._want_repair()
            return False
        with self._view_lock:
            self._view.apply(event)
            self._applied = seq
            if self._own:
                self._own.prune(self._view, seq)
        self._wake_synced()
        self._emit(event)
        return True


def _millis(seconds: float, what: str) -> int:
    if seconds < 0:
        raise BadInput(f"{what} must not be negative", field=what)
    return round(seconds * 1000)


class _LoopThread:
    """An event loop running on a daemon thread, driven from other threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="fleetbus-session", daemon=True
        )
        self._thread.start()

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

    One private event-loop thread runs the core; every method blocks until the
    core has done its part. Replica reads (:meth:`holders`, :meth:`may_edit`,
    :meth:`claims`) do not cross threads.
    """

    _core: AsyncSession
    _runner: _LoopThread

    def __init__(self, core: AsyncSession, runner: _LoopThread) -> None:
        self._core = core
        self._runner = runner

    @classmethod
    def connect(cls, url: str | None = None, **options: Any) -> Session:
        """Join the fleet; takes the arguments of :meth:`AsyncSession.connect`."""
        runner = _LoopThread()
        try:
            core = runner.run(AsyncSession.connect(url, **options))
        except BaseException:
            runner.stop()
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
        """See :meth:`AsyncSession.close`; also ends the loop thread."""
        if self._runner.loop.is_closed():
            return
        try:
            self._runner.run(self._core.close(leave=leave))
        finally:
            self._runner.stop()

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
