"""Learned facts in the session SDK: publish, query, follow, shown-once.

:class:`FactsMixin` gives :class:`~fleetbus.client.session.AsyncSession` its
fact methods and :class:`SyncFactsMixin` gives the blocking
:class:`~fleetbus.client.session.Session` the same.

Following a scope (:meth:`FactsMixin.subscribe`, and every scope the session
claims once it follows facts at all) works like the claim replica: subscribe
the event socket first and buffer, fetch the retained facts over the control
channel, then take the live events that are newer. Each facts topic is a
stream whose events carry ``prev``; a mismatch means an event was lost, and the
session fetches what changed since over the control channel. It does the same
when a broker heartbeat carries a later ``seq`` than the followed scopes are
known up to, which is how a lost last event of a topic shows. Repeats (the
same event on several topics, or a fact already in the retained set) are
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
)
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from fleetbus import log
from fleetbus.client.connection import SessionClosed
from fleetbus.errors import BadInput, FleetbusError
from fleetbus.facts import Fact, FactEvent, FactFeed
from fleetbus.repo import RepoInfo, resolve_scope
from fleetbus.scope import Scope

if TYPE_CHECKING:
    from fleetbus.client.transport import Transport

_log = log.get("fleetbus.client.facts")

T = TypeVar("T")
FactCallback = Callable[[FactEvent], None]

_PAGE = 10_000
_MAX_BUFFER = 100_000


class _FactsState:
    """What a session keeps to follow facts: the feed, buffers and listeners."""

    def __init__(self, repo: str) -> None:
        self.feed = FactFeed(repo)
        self.queues: list[asyncio.Queue[FactEvent | None]] = []
        self.callbacks: list[FactCallback] = []
        self.buffering = 0
        self.buffer: list[tuple[bytes, dict[str, Any]]] = []
        self.lock = asyncio.Lock()
        # Every change on the followed scopes up to this seq has been told,
        # live or fetched; None until a scope is followed.
        self.synced: int | None = None
        self.checking = False
        # The SUB prefixes this session subscribed, undone when it closes.
        self.prefixes: list[bytes] = []


class FactsMixin:
    """The fact operations of an :class:`AsyncSession`."""

    if TYPE_CHECKING:
        sid: str
        repo: RepoInfo
        heartbeat_ms: int
        _transport: Transport
        _replica: bool
        _closed: bool

        async def _request(
            self,
            op: str,
            *,
            patience: float | None = None,
            timeout: float | None = None,
            **fields: Any,
        ) -> dict[str, Any]: ...

        def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

        def on_event(self, callback: Callable[[dict[str, Any]], None]) -> None: ...

        def claims(self, *, mine: bool = False) -> list[Any]: ...

    _facts_state: _FactsState | None = None

    # -- publishing -------------------------------------------------------------

    async def publish(
        self,
        *topics: str,
        text: str,
        kind: str | None = None,
        ttl: float | None = None,
        supersedes: str | None = None,
    ) -> Fact:
        """Publish a fact on ``topics`` (paths, directories, globs, ``@names``).

        ``kind`` is ``note`` (default), ``warning``, ``decision``, ``gotcha``
        or ``question``; ``ttl`` (seconds) makes it expire; ``supersedes``
        names a live fact it replaces (whose topics and kind it then takes
        unless given). Returns the fact as the broker stored it. Raises
        :class:`LimitExceeded` for a text over 4 KiB, :class:`BadInput` or
        :class:`BadScope` for anything else malformed.
        """
        fields: dict[str, Any] = {
            "topics": [resolve_scope(t, self.repo).text for t in topics],
            "body": text,
        }
        if kind is not None:
            fields["kind"] = kind
        if ttl is not None:
            if not 0 < ttl < math.inf:
                raise BadInput(
                    f"a fact's ttl must be a finite number of seconds > 0, not {ttl!r}",
                    field="ttl",
                )
            fields["ttl_ms"] = max(1, round(ttl * 1000))
        if supersedes is not None:
            fields["supersedes"] = supersedes
        reply = await self._request("publish", **fields)
        return Fact.from_wire(reply["fact"])

    async def supersede(
        self,
        fact_id: str,
        text: str,
        *topics: str,
        kind: str | None = None,
        ttl: float | None = None,
    ) -> Fact:
        """Replace the live fact ``fact_id`` with a new one; see :meth:`publish`."""
        return await self.publish(
            *topics, text=text, kind=kind, ttl=ttl, supersedes=fact_id
        )

    async def retract(self, fact_id: str) -> Fact:
        """Withdraw a fact this session published; :class:`NotOwner` otherwise."""
        reply = await self._request("retract", id=fact_id)
        return Fact.from_wire(reply["fact"])

    # -- queries ----------------------------------------------------------------

    async def facts(
        self,
        *scopes: str,
        kind: str | None = None,
        author: str | None = None,
        since: int | float | datetime | timedelta | None = None,
        search: str | None = None,
        limit: int = 100,
        include_history: bool = False,
    ) -> list[Fact]:
        """The retained facts with a topic overlapping one of ``scopes`` (or all).

        ``author`` is a session id or name. ``since`` is a sequence number
        (an ``int``), a wall time (a ``float`` or a ``datetime``) or an age
        (a ``timedelta``). ``search`` keeps facts whose text has every word.
        Superseded, retracted and expired facts come only with
        ``include_history``. At most ``limit`` facts, oldest first.
        """
        fields: dict[str, Any] = {
            "repo": self.repo.id,
            "limit": limit,
            "include_history": include_history,
        }
        if scopes:
            fields["scopes"] = [resolve_scope(s, self.repo).text for s in scopes]
        if kind is not None:
            fields["kind"] = kind
        if author is not None:
            fields["author"] = author
        if search is not None:
            fields["search"] = search
        fields.update(since_fields(since))
        reply = await self._request("facts", **fields)
        return [Fact.from_wire(data) for data in reply["facts"]]

    async def unseen(
        self, *scopes: str, mark: bool = True, limit: int = 100
    ) -> list[Fact]:
        """Live facts on ``scopes`` (default: the scopes this session claims
        and follows) not yet shown to this session id, leaving out its own.

        With ``mark``, the broker records them as shown in the same step, so
        they are returned once, across reconnects and restarts.
        """
        fields: dict[str, Any] = {"mark": mark, "limit": limit}
        if scopes:
            fields["scopes"] = [resolve_scope(s, self.repo).text for s in scopes]
        elif self.followed:
            held = [row.scope.text for row in self.claims(mine=True)]
            followed = [scope.text for scope in self.followed]
            fields["scopes"] = list(dict.fromkeys(held + followed))
        reply = await self._request("unseen", **fields)
        return [Fact.from_wire(data) for data in reply["facts"]]

    async def mark_seen(self, ids: Iterable[str]) -> list[str]:
        """Record facts as shown to this session; returns the ids known."""
        reply = await self._request("seen", ids=list(ids))
        return [str(i) for i in reply["marked"]]

    # -- following ----------------------------------------------------------------

    async def subscribe(self, *scopes: str) -> list[Fact]:
        """Follow facts on ``scopes``: returns the retained live ones that
        overlap, and from then on delivers changes to :meth:`fact_events` and
        :meth:`on_fact` listeners (the retained ones too, first)."""
        state = self._facts_start()
        return await self._facts_follow(
            state, [resolve_scope(s, self.repo) for s in scopes]
        )

    def fact_events(self) -> AsyncGenerator[FactEvent, None]:
        """Changes to the facts this session follows, from now on.

        Following starts with the first call (of this, :meth:`on_fact` or
        :meth:`subscribe`) and covers every scope the session claims. The
        iterator ends when the session closes.
        """
        state = self._facts_start()
        queue: asyncio.Queue[FactEvent | None] = asyncio.Queue()
        state.queues.append(queue)
        return queue_stream(state.queues, queue)

    def on_fact(self, callback: FactCallback) -> None:
        """Call ``callback(event)`` for every event :meth:`fact_events` yields.

        The callback runs on the session's event loop and must not block.
        """
        self._facts_start().callbacks.append(callback)

    @property
    def followed(self) -> list[Scope]:
        """The scopes whose facts this session follows."""
        state = self._facts_state
        return [] if state is None else list(state.feed.scopes)

    def _facts_start(self) -> _FactsState:
        state = self._facts_state
        if state is not None:
            return state
        if not self._replica:
            raise BadInput("following facts needs a session with a replica")
        state = self._facts_state = _FactsState(self.repo.id)
        self.on_event(self._facts_on_claims)
        held = [row.scope for row in self.claims(mine=True)]
        if held:
            self._spawn(self._facts_follow_quietly(state, held))
        return state

    def _facts_on_claims(self, event: dict[str, Any]) -> None:
        state = self._facts_state
        if state is None:
            return
        kind = event.get("type")
        if kind == "claim.granted" and event.get("sid") == self.sid:
            scopes = [resolve_scope(row["scope"], self.repo) for row in event["claims"]]
            self._spawn(self._facts_follow_quietly(state, scopes))
        elif kind in ("resync", "session.lost") and state.synced is not None:
            self._spawn(self._facts_catch_up(state, state.synced))

    def _facts_on_heartbeat(self, event: dict[str, Any]) -> None:
        """Catch up when the repository moved past what is known to be told.

        A lost event shows as a broken ``prev`` at the next event of its
        topic; the last one of a topic has no next, so the broker's heartbeat,
        which carries the ``seq`` of the repository's last fact event
        (``facts``; brokers that do not know it send only the repository's
        ``seq``), is what tells of it. So are events published while a new
        subscription was on its way to the broker's PUB, which never arrive
        and which nothing else would tell.
        """
        state = self._facts_state
        seq = event.get("facts", event.get("seq"))
        if state is None or state.synced is None or not isinstance(seq, int):
            return
        if seq > state.synced and not state.checking:
            state.checking = True
            self._spawn(self._facts_check(state, state.synced))

    async def _facts_check(self, state: _FactsState, since: int) -> None:
        try:
            await self._facts_catch_up(state, since)
        finally:
            state.checking = False

    async def _facts_follow_quietly(
        self, state: _FactsState, scopes: list[Scope]
    ) -> None:
        try:
            await self._facts_follow(state, scopes)
        except FleetbusError as exc:
            _log.warning("facts.follow_failed", sid=self.sid, error=str(exc))

    async def _facts_follow(
        self, state: _FactsState, scopes: list[Scope]
    ) -> list[Fact]:
        if self._closed:
            raise SessionClosed("the session is closed")
        added, prefixes = state.feed.follow(scopes)
        if not added:
            return []
        state.buffering += 1
        try:
            for prefix in prefixes:
                state.prefixes.append(prefix)
                self._transport.subscribe(prefix)
            facts, at = await self._facts_fetch([s.text for s in added], since=None)
            state.feed.tracker.subscribed(prefixes, at)
            state.synced = at if state.synced is None else min(state.synced, at)
            events = state.feed.retained(facts)
        finally:
            state.buffering -= 1
        self._facts_deliver(state, events)
        if not state.buffering:
            buffered, state.buffer = state.buffer, []
            for topic, event in buffered:
                self._facts_live(state, topic, event)
        return [event.fact for event in events if event.fact is not None]

    async def _facts_fetch(
        self, scopes: list[str] | None, *, since: int | None
    ) -> tuple[list[Fact], int]:
        """Every fact on ``scopes`` (``None``: all): live ones, or all that
        changed after ``since``.

        Returns them and the sequence number of the first page.
        """
        out: list[Fact] = []
        first: int | None = None
        cursor = since
        while True:
            fields: dict[str, Any] = {"repo": self.repo.id, "limit": _PAGE}
            if scopes is not None:
                fields["scopes"] = scopes
            if since is None:
                fields["since"] = cursor or 0
            else:
                fields["changed_since"] = cursor
            reply = await self._request("facts", **fields)
            page = [Fact.from_wire(data) for data in reply["facts"]]
            out.extend(page)
            first = int(reply["seq"]) if first is None else first
            if not reply.get("more") or not page:
                return out, first
            last = page[-1]
            cursor = last.seq if since is None else last.changed

    async def _facts_catch_up(self, state: _FactsState, since: int) -> None:
        """Fetch what changed after ``since`` and tell what the followed
        scopes overlap.

        The query names no scopes: a session that claimed many files follows
        many scopes, while what changed in a heartbeat's time is little.
        """
        if self._closed or not state.feed.scopes:
            return
        async with state.lock:
            try:
                facts, at = await self._facts_fetch(None, since=since)
            except FleetbusError as exc:
                _log.warning("facts.catch_up_failed", sid=self.sid, error=str(exc))
                return
            if state.synced is not None and since <= state.synced:
                state.synced = max(state.synced, at)
            self._facts_deliver(state, state.feed.retained(facts))

    def _on_fact_event(self, topic: bytes, event: dict[str, Any]) -> None:
        """Take one event of a facts stream from the event socket."""
        state = self._facts_state
        if state is None:
            return
        if state.buffering:
            if len(state.buffer) < _MAX_BUFFER:
                state.buffer.append((topic, event))
            return
        self._facts_live(state, topic, event)

    def _facts_live(
        self, state: _FactsState, topic: bytes, event: dict[str, Any]
    ) -> None:
        events, missed_after = state.feed.live(topic, event)
        if missed_after is not None:
            seq = event.get("seq")
            _log.info("facts.gap", sid=self.sid, after=missed_after, seq=seq)
            self._spawn(self._facts_catch_up(state, missed_after))
        self._facts_deliver(state, events)

    def _facts_deliver(self, state: _FactsState, events: list[FactEvent]) -> None:
        for event in events:
            for queue in state.queues:
                queue.put_nowait(event)
            for callback in state.callbacks:
                try:
                    callback(event)
                except Exception:
                    _log.exception("facts.callback_failed", sid=self.sid)

    def _facts_close(self) -> None:
        """End every :meth:`fact_events` iterator; drop the subscriptions."""
        state = self._facts_state
        if state is not None:
            prefixes, state.prefixes = state.prefixes, []
            for prefix in prefixes:
                self._transport.unsubscribe(prefix)
            for queue in state.queues:
                queue.put_nowait(None)


async def queue_stream(
    queues: list[asyncio.Queue[T | None]], queue: asyncio.Queue[T | None]
) -> AsyncGenerator[T, None]:
    """Yield what ``queue`` receives until ``None``, then drop it from ``queues``."""
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item
    finally:
        with contextlib.suppress(ValueError):
            queues.remove(queue)


def since_fields(since: int | float | datetime | timedelta | None) -> dict[str, Any]:
    """The ``facts`` request fields for a ``since`` given as the SDK takes it."""
    if since is None:
        return {}
    if isinstance(since, bool):
        raise BadInput("'since' must be a seq, a time or an age", field="since")
    if isinstance(since, int):
        return {"since": since}
    if isinstance(since, float):
        return {"since_time": since}
    if isinstance(since, datetime):
        return {"since_time": since.timestamp()}
    if isinstance(since, timedelta):
        return {"since_time": datetime.now().timestamp() - since.total_seconds()}
    raise BadInput("'since' must be a seq, a time or an age", field="since")


class SyncFactsMixin:
    """The fact operations of the blocking :class:`Session`."""

    if TYPE_CHECKING:
        from fleetbus.client.session import _LoopThread

        _core: FactsMixin
        _runner: _LoopThread

    def publish(self, *topics: str, text: str, **options: Any) -> Fact:
        """See :meth:`FactsMixin.publish`."""
        return self._facts_run(self._core.publish(*topics, text=text, **options))

    def supersede(self, fact_id: str, text: str, *topics: str, **options: Any) -> Fact:
        """See :meth:`FactsMixin.supersede`."""
        return self._facts_run(self._core.supersede(fact_id, text, *topics, **options))

    def retract(self, fact_id: str) -> Fact:
        """See :meth:`FactsMixin.retract`."""
        return self._facts_run(self._core.retract(fact_id))

    def facts(self, *scopes: str, **options: Any) -> list[Fact]:
        """See :meth:`FactsMixin.facts`."""
        return self._facts_run(self._core.facts(*scopes, **options))

    def unseen(self, *scopes: str, mark: bool = True, limit: int = 100) -> list[Fact]:
        """See :meth:`FactsMixin.unseen`."""
        return self._facts_run(self._core.unseen(*scopes, mark=mark, limit=limit))

    def mark_seen(self, ids: Iterable[str]) -> list[str]:
        """See :meth:`FactsMixin.mark_seen`."""
        return self._facts_run(self._core.mark_seen(list(ids)))

    def subscribe(self, *scopes: str) -> list[Fact]:
        """See :meth:`FactsMixin.subscribe`."""
        return self._facts_run(self._core.subscribe(*scopes))

    def on_fact(self, callback: FactCallback) -> None:
        """See :meth:`FactsMixin.on_fact`; the callback runs on the loop thread."""
        self._facts_run(_call(self._core.on_fact, callback))

    def fact_events(self) -> Iterator[FactEvent]:
        """See :meth:`FactsMixin.fact_events`; each step blocks for the next.

        Following starts at this call, not at the first step.
        """
        return self._facts_steps(self._facts_run(_call(self._core.fact_events)))

    def _facts_steps(
        self, stream: AsyncGenerator[FactEvent, None]
    ) -> Iterator[FactEvent]:
        try:
            while True:
                try:
                    yield self._facts_run(_next(stream))
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(RuntimeError):
                self._facts_run(stream.aclose())

    def _facts_run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)


async def _next(stream: AsyncGenerator[FactEvent, None]) -> FactEvent:
    return await anext(stream)


async def _call(function: Callable[..., T], *args: Any) -> T:
    """Run a plain call on the session's loop (it may create loop objects)."""
    return function(*args)


__all__ = [
    "FactCallback",
    "FactsMixin",
    "SyncFactsMixin",
    "queue_stream",
    "since_fields",
]
