"""The claim table: who holds which scope, who waits for one, and what changed.

A pure state machine: no I/O, no clock reads (every call is given the time), no
logging. The broker keeps the authoritative :class:`ClaimTable` of each
repository; every client keeps a :class:`ClaimView`, the same table rebuilt
from a snapshot and the claims stream.

The table never mutates its view directly. It decides, builds the events of
the change, stamps them with the repository's sequence and applies them to its
own view with :meth:`ClaimView.apply`, the very code a replica runs, so the
two cannot drift apart.

Claims are stored one row per scope. A request for several scopes is granted
whole or not at all, as one *grant* whose rows share the grant id and the
fencing token (the sequence number of the ``claim.granted`` event).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

from fleetbus.errors import (
    BadInput,
    Conflict,
    Deadlock,
    LimitExceeded,
    NotOwner,
    ProtocolError,
    Refused,
    TimedOut,
    UnknownSession,
)
from fleetbus.scope import Scope, ScopeIndex, literal_scope, parse_scope
from fleetbus.sequence import CLAIMS_STREAM, Sequence

Mode = Literal["exclusive", "shared"]
MODES: tuple[Mode, ...] = ("exclusive", "shared")


def modes_conflict(a: Mode, b: Mode) -> bool:
    """Whether claims in modes ``a`` and ``b`` on overlapping scopes exclude."""
    return a == "exclusive" or b == "exclusive"


@dataclass(frozen=True, slots=True)
class Limits:
    """The sizes and counts a table refuses to exceed (the protocol's limits)."""

    scopes_per_claim: int = 64
    claims_per_session: int = 4096
    sessions_per_repo: int = 1024
    intent_len: int = 1024


@dataclass(frozen=True, slots=True)
class Now:
    """The time of a change: wall time to store and show, monotonic for deadlines."""

    wall: float
    mono: float


def _utc(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _mode(value: Any) -> Mode:
    if value not in MODES:
        raise BadInput(f"mode must be 'exclusive' or 'shared', not {value!r}")
    return cast(Mode, value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _wire_scope(text: Any) -> Scope:
    """A scope as the broker sends it, parsed; ``ProtocolError`` if malformed."""
    if type(text) is str:
        # Most rows are canonical literal paths: no cache lookup for them.
        literal = literal_scope(text)
        if literal is not None:
            return literal
    try:
        return parse_scope(text)
    except (BadInput, TypeError) as exc:
        raise ProtocolError(f"malformed scope {text!r}: {exc}") from exc


# The fields a claim group gives all its rows, in Claim's order less id and scope.
_Shared = tuple[str, str, Mode, str, str, int, float, float | None]


def _group_rows(group: Any) -> tuple[_Shared, list[str], list[Any]]:
    """Check one ``claim_groups`` entry: (shared fields, ids, scope texts)."""
    sid, name, mode, intent, grant, fence, since, expires, ids, texts = group
    if not (isinstance(ids, list) and isinstance(texts, list)):
        raise TypeError("ids and scopes must be lists")
    if len(ids) != len(texts) or not ids:
        raise ValueError("a group needs as many ids as scopes, at least one")
    if not all(type(cid) is str for cid in ids):
        raise TypeError("claim ids must be strings")
    shared: _Shared = (
        str(sid),
        str(name),
        _mode(mode),
        str(intent),
        str(grant),
        int(fence),
        float(since),
        _optional_float(expires),
    )
    return shared, ids, texts


@dataclass(slots=True)
class Claim:
    """One held scope: a row of the claim table.

    ``since`` and ``expires`` are wall times; ``expires`` is ``None`` for a
    claim that lives on its session's lease.
    """

    id: str
    sid: str
    name: str
    scope: Scope
    mode: Mode
    intent: str
    grant: str
    fence: int
    since: float
    expires: float | None

    def to_wire(self) -> dict[str, Any]:
        """The row as the protocol carries it."""
        return {
            "id": self.id,
            "sid": self.sid,
            "name": self.name,
            "scope": self.scope.text,
            "mode": self.mode,
            "intent": self.intent,
            "grant": self.grant,
            "fence": self.fence,
            "since": self.since,
            "expires": self.expires,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Claim:
        """Rebuild a row from its wire form; ``ProtocolError`` if malformed."""
        try:
            return cls(
                id=str(data["id"]),
                sid=str(data["sid"]),
                name=str(data["name"]),
                scope=_wire_scope(data["scope"]),
                mode=_mode(data["mode"]),
                intent=str(data["intent"]),
                grant=str(data["grant"]),
                fence=int(data["fence"]),
                since=float(data["since"]),
                expires=_optional_float(data.get("expires")),
            )
        except (KeyError, TypeError, ValueError, BadInput) as exc:
            raise ProtocolError(f"malformed claim row: {exc}") from exc

    def holder(self) -> dict[str, Any]:
        """The row as a refusal names it to the refused session."""
        return {
            "sid": self.sid,
            "name": self.name,
            "scope": self.scope.text,
            "mode": self.mode,
            "intent": self.intent,
            "since": self.since,
            "expires": self.expires,
        }

    def describe(self) -> str:
        """One readable sentence: what is held, by whom, since when and why."""
        shared = " (shared)" if self.mode == "shared" else ""
        until = "" if self.expires is None else f" until {_utc(self.expires)}"
        why = f"intent {self.intent!r}" if self.intent else "no intent given"
        return (
            f"{self.scope.text} is held{shared} by {self.name} (sid {self.sid}) "
            f"since {_utc(self.since)}{until}: {why}"
        )


@dataclass(slots=True)
class SessionInfo:
    """A session known to the table. ``joined`` and ``last_seen`` are wall times."""

    sid: str
    name: str
    meta: dict[str, Any]
    leased: bool
    lease_s: float
    joined: float
    last_seen: float

    def to_wire(self) -> dict[str, Any]:
        """The session as the protocol carries it (durations in milliseconds)."""
        return {
            "sid": self.sid,
            "name": self.name,
            "meta": dict(self.meta),
            "leased": self.leased,
            "lease_ms": self.lease_s * 1000.0,
            "joined": self.joined,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> SessionInfo:
        """Rebuild a session from its wire form; ``ProtocolError`` if malformed."""
        try:
            return cls(
                sid=str(data["sid"]),
                name=str(data["name"]),
                meta=dict(data.get("meta") or {}),
                leased=bool(data["leased"]),
                lease_s=float(data["lease_ms"]) / 1000.0,
                joined=float(data["joined"]),
                last_seen=float(data["last_seen"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed session: {exc}") from exc


@dataclass(slots=True)
class Waiter:
    """A claim request queued until its scopes are free or its deadline passes.

    ``ttl_s`` and the monotonic ``deadline`` are known to the broker only: a
    replica sees ``None`` and infinity.
    """

    sid: str
    rid: str
    scopes: tuple[Scope, ...]
    mode: Mode
    intent: str
    ttl_s: float | None
    since: float
    deadline: float

    def to_wire(self) -> dict[str, Any]:
        """The waiter as a snapshot and the ``wait.queued`` event carry it."""
        return {
            "sid": self.sid,
            "rid": self.rid,
            "scopes": [scope.text for scope in self.scopes],
            "mode": self.mode,
            "intent": self.intent,
            "since": self.since,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Waiter:
        """Rebuild a waiter from its wire form; ``ProtocolError`` if malformed."""
        try:
            return cls(
                sid=str(data["sid"]),
                rid=str(data["rid"]),
                scopes=tuple(parse_scope(text) for text in data["scopes"]),
                mode=_mode(data["mode"]),
                intent=str(data["intent"]),
                ttl_s=None,
                since=float(data["since"]),
                deadline=math.inf,
            )
        except (KeyError, TypeError, ValueError, BadInput) as exc:
            raise ProtocolError(f"malformed waiter: {exc}") from exc

    def conflicts_with(self, scopes: Iterable[Scope], mode: Mode) -> bool:
        """Whether this waiter's request and ``scopes`` in ``mode`` exclude."""
        if not modes_conflict(self.mode, mode):
            return False
        return any(a.overlaps(b) for b in scopes for a in self.scopes)


@dataclass(slots=True)
class Outcome:
    """What a table call changed and what to answer.

    ``events`` are stamped and in order; ``reply`` holds the fields of the
    direct success reply, or is ``None`` when the request was queued (then
    ``queued`` is its position) or has no reply. ``deferred`` holds the final
    replies, ``(sid, rid, reply)``, of earlier waits this change ended.
    ``lost`` names each session whose lease ran out while it held claims, with
    the scopes it held: those its lease bound first, then those with a TTL.
    """

    events: list[dict[str, Any]]
    reply: dict[str, Any] | None
    queued: int | None = None
    deferred: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    lost: list[tuple[SessionInfo, list[str]]] = field(default_factory=list)


class ClaimView:
    """The claim table as a replica sees it: rows, sessions and waiters.

    Built from a snapshot with :meth:`load` and kept current with
    :meth:`apply`; answers "who holds this path" and "may I edit it" locally.
    """

    sessions: dict[str, SessionInfo]
    waiters: list[Waiter]
    head: int
    """The ``seq`` of the last event applied, or the snapshot's head."""

    def __init__(self, *, eager: bool = False) -> None:
        # The broker's table asks for an eager index: its tree of literal
        # paths is kept current rather than built on the first pattern query.
        self._eager = eager
        self._reset()

    def _reset(self) -> None:
        self.sessions = {}
        self.waiters = []
        self.head = 0
        self._rows: dict[str, Claim] = {}
        self._by_sid: dict[str, dict[str, Claim]] = {}
        self._by_grant: dict[str, list[str]] = {}
        self._index: ScopeIndex[Claim] = ScopeIndex(eager=self._eager)

    def __len__(self) -> int:
        return len(self._rows)

    def load(self, snapshot: dict[str, Any]) -> None:
        """Replace the whole view with ``snapshot``.

        Takes either form :meth:`snapshot` gives: rows as ``claims`` (one
        object each) or as ``claim_groups`` (compact, see
        ``docs/protocol.md``). A malformed snapshot raises ``ProtocolError``
        and leaves the view empty.
        """
        self._reset()
        try:
            self._load(snapshot)
        except ProtocolError:
            self._reset()
            raise

    def _load(self, snapshot: dict[str, Any]) -> None:
        for data in snapshot.get("sessions", ()):
            info = SessionInfo.from_wire(data)
            self.sessions[info.sid] = info
        groups = snapshot.get("claim_groups")
        if groups is not None:
            self._load_groups(groups)
        else:
            for data in snapshot.get("claims", ()):
                self._add(Claim.from_wire(data))
        self.waiters = [Waiter.from_wire(data) for data in snapshot.get("waiters", ())]
        self.head = int(snapshot.get("head", 0))

    def _load_groups(self, groups: Any) -> None:
        if not isinstance(groups, list):
            raise ProtocolError("claim_groups must be a list")
        rows = self._rows
        add = self._index.add
        count = 0
        for group in groups:
            try:
                shared, ids, texts = _group_rows(group)
            except (TypeError, ValueError, BadInput) as exc:
                raise ProtocolError(f"malformed claim group: {exc}") from exc
            sid, name, mode, intent, grant, fence, since, expires = shared
            own = self._by_sid.setdefault(sid, {})
            for cid, text in zip(ids, texts, strict=True):
                scope = literal_scope(text) if type(text) is str else None
                if scope is None:
                    scope = _wire_scope(text)
                row = Claim(
                    cid, sid, name, scope, mode, intent, grant, fence, since, expires
                )
                rows[cid] = row
                own[cid] = row
                add(scope, row)
            self._by_grant.setdefault(grant, []).extend(ids)
            count += len(ids)
        if len(rows) != count:
            raise ProtocolError("a claim id appears more than once in the snapshot")

    def snapshot(self, *, compact: bool = False) -> dict[str, Any]:
        """The whole view in wire form, as :meth:`load` takes it.

        Rows go as ``claims``, one object each, or with ``compact`` as
        ``claim_groups``: runs of rows that share everything but id and scope.
        """
        rows: dict[str, Any]
        if compact:
            rows = {"claim_groups": self.claim_groups()}
        else:
            rows = {"claims": [row.to_wire() for row in self._rows.values()]}
        return {
            "head": self.head,
            "sessions": [info.to_wire() for info in self.sessions.values()],
            **rows,
            "waiters": [waiter.to_wire() for waiter in self.waiters],
        }

    def claim_groups(self) -> list[list[Any]]:
        """Every row, in order, in the compact ``claim_groups`` form.

        Each group is ``[sid, name, mode, intent, grant, fence, since,
        expires, [ids], [scopes]]`` for a run of consecutive rows that agree
        on all but id and scope.
        """
        groups: list[list[Any]] = []
        last: tuple[Any, ...] = ()
        ids: list[str] = []
        texts: list[str] = []
        for row in self._rows.values():
            key = (
                row.sid,
                row.name,
                row.mode,
                row.intent,
                row.grant,
                row.fence,
                row.since,
                row.expires,
            )
            if key != last:
                ids, texts, last = [], [], key
                groups.append([*key, ids, texts])
            ids.append(row.id)
            texts.append(row.scope.text)
        return groups

    def apply(self, event: dict[str, Any]) -> None:
        """Apply one claims-stream event; events of unknown type are ignored."""
        try:
            self._apply(event)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed {event.get('type')} event: {exc}") from exc
        seq = event.get("seq")
        if isinstance(seq, int):
            self.head = seq

    def warm(self, budget: int | None = None) -> bool:
        """Build what the index builds on demand, at most ``budget`` paths this
        call (see ``ScopeIndex.build_tree``); whether all of it is built."""
        return self._index.build_tree(budget)

    def granted(self, rows: list[Claim], seq: int) -> None:
        """Apply a ``claim.granted`` event of sequence ``seq`` given as rows."""
        for row in rows:
            self._add(row)
        self.head = seq

    def _apply(self, event: dict[str, Any]) -> None:
        match event.get("type"):
            case "session.joined":
                info = SessionInfo.from_wire(event["session"])
                self.sessions[info.sid] = info
            case "session.left" | "session.lost":
                self.sessions.pop(event["sid"], None)
            case "claim.granted":
                for data in event["claims"]:
                    self._add(Claim.from_wire(data))
            case "claim.released":
                for cid in event["ids"]:
                    self._remove(cid)
            case "claim.renewed":
                expires = _optional_float(event["expires"])
                for cid in event["ids"]:
                    if cid in self._rows:
                        self._rows[cid].expires = expires
            case "wait.queued":
                self.waiters.append(Waiter.from_wire(event))
            case "wait.ended":
                self.waiters = [
                    w
                    for w in self.waiters
                    if not (w.sid == event["sid"] and w.rid == event["rid"])
                ]

    def _add(self, row: Claim) -> None:
        cid = row.id
        self._rows[cid] = row
        own = self._by_sid.get(row.sid)
        if own is None:
            own = self._by_sid[row.sid] = {}
        own[cid] = row
        ids = self._by_grant.get(row.grant)
        if ids is None:
            self._by_grant[row.grant] = [cid]
        else:
            ids.append(cid)
        self._index.add(row.scope, row)

    def _remove(self, cid: str) -> None:
        row = self._rows.pop(cid, None)
        if row is None:
            return
        self._index.discard(row.scope, row)
        own = self._by_sid[row.sid]
        del own[cid]
        if not own:
            del self._by_sid[row.sid]
        ids = self._by_grant[row.grant]
        ids.remove(cid)
        if not ids:
            del self._by_grant[row.grant]

    def get(self, cid: str) -> Claim | None:
        """The row with id ``cid``, if held."""
        return self._rows.get(cid)

    def grant_rows(self, grant: str) -> list[Claim]:
        """The rows still held of one grant."""
        return [self._rows[cid] for cid in self._by_grant.get(grant, ())]

    def claims(self, sid: str | None = None) -> list[Claim]:
        """Every row, or the rows of session ``sid``, in grant order."""
        if sid is None:
            return list(self._rows.values())
        return list(self._by_sid.get(sid, {}).values())

    def count(self, sid: str) -> int:
        """How many rows session ``sid`` holds."""
        return len(self._by_sid.get(sid, ()))

    def overlapping(self, scope: Scope) -> Iterator[Claim]:
        """The rows whose scope overlaps ``scope``."""
        for _, row in self._index.overlapping(scope):
            yield row

    def holders(self, path: str) -> list[Claim]:
        """The rows whose scope matches the repo-relative ``path``."""
        index = self._index
        if path[:1] == "@":
            return [row for _, row in index.matching(path)]
        found = [row for _, row in index.pattern_matching(path)]
        found.extend(index.literal_items(path))
        return found

    def conflicts(self, scopes: Iterable[Scope], mode: Mode, sid: str) -> list[Claim]:
        """The rows of other sessions that a claim of ``scopes`` would conflict with.

        Each row once, in grant order.
        """
        found: dict[str, Claim] = {}
        for scope in scopes:
            for row in self.overlapping(scope):
                if row.sid != sid and modes_conflict(row.mode, mode):
                    found[row.id] = row
        return sorted(found.values(), key=lambda row: (row.fence, row.id))

    def may_edit(self, path: str, sid: str) -> bool:
        """Whether ``sid`` may edit ``path``: no other session holds a match.

        That is, an exclusive claim of the path by ``sid`` would be granted.
        """
        index = self._index
        for row in index.literal_items(path):
            if row.sid != sid:
                return False
        for _, row in index.pattern_matching(path):
            if row.sid != sid:
                return False
        if path[:1] == "@":
            return all(row.sid == sid for _, row in index.matching(path))
        return True

    def waiter(self, sid: str, rid: str) -> Waiter | None:
        """The queued request ``rid`` of ``sid``, if it is still waiting."""
        for waiter in self.waiters:
            if waiter.sid == sid and waiter.rid == rid:
                return waiter
        return None


_SESSION_END_EVENT = {"session_left": "session.left", "session_lost": "session.lost"}


class ClaimTable:
    """The authoritative claim table of one repository, as the broker keeps it.

    Every mutating call returns an :class:`Outcome`. A call that raises has
    changed nothing and emitted nothing (a lease renewal aside).
    """

    def __init__(
        self, repo: str, sequence: Sequence, limits: Limits | None = None
    ) -> None:
        self.repo = repo
        self.sequence = sequence
        self.limits = limits or Limits()
        self.view = ClaimView(eager=True)
        self.view.head = sequence.head(CLAIMS_STREAM)
        # Claim ids are unique across repositories, as a store keyed by id
        # needs, while staying short and derived from state alone.
        self._tag = hashlib.blake2b(repo.encode(), digest_size=6).hexdigest()
        self._deadlines: dict[str, float] = {}
        # Lease deadlines in a heap, one live entry per session (``_armed``):
        # a renewal only moves ``_deadlines``, and an entry that comes up
        # early moves on to the current deadline, so that the next deadline is
        # found without looking at every session.
        self._lease_heap: list[tuple[float, str]] = []
        self._armed: dict[str, float] = {}
        self._last_seen: dict[str, float] = {}
        self._ttl_heap: list[tuple[float, str]] = []
        self._groups: list[list[Any]] | None = None
        self._groups_head = -1

    # -- sessions -----------------------------------------------------------

    def join(
        self,
        sid: str,
        name: str,
        meta: dict[str, Any],
        *,
        leased: bool,
        lease_s: float,
        now: Now,
    ) -> Outcome:
        """Open a session, or resume a live one with the same ``sid``.

        Reply: ``{"session": info, "resumed": bool}``. Resuming renews the lease
        and emits nothing; the name, meta and lease of the first join stay.
        """
        if sid in self.view.sessions:
            self.touch(sid, now)
            info = self.view.sessions[sid]
            return Outcome([], {"session": info.to_wire(), "resumed": True})
        _check_duration("lease_s", lease_s)
        if len(self.view.sessions) >= self.limits.sessions_per_repo:
            raise LimitExceeded(
                f"repository {self.repo} has {self.limits.sessions_per_repo} "
                "sessions already",
                limit="sessions_per_repo",
            )
        info = SessionInfo(sid, name, dict(meta), leased, lease_s, now.wall, now.wall)
        out = Outcome([], None)
        self._emit(out, {"type": "session.joined", "session": info.to_wire()})
        self.touch(sid, now)
        out.reply = {"session": self.view.sessions[sid].to_wire(), "resumed": False}
        return out

    def touch(self, sid: str, now: Now) -> None:
        """Renew the lease of ``sid``; ``UnknownSession`` if there is none."""
        info = self._session(sid)
        deadline = now.mono + info.lease_s
        self._deadlines[sid] = deadline
        self._last_seen[sid] = now.wall
        if deadline < self._armed.get(sid, math.inf):
            self._arm(sid, deadline)

    def leave(self, sid: str, now: Now) -> Outcome:
        """End a session cleanly: its lease-bound claims are released at once."""
        self.touch(sid, now)
        out = Outcome([], {})
        self._end_session(sid, "session_left", out)
        self._drain(now, out)
        return out

    def last_seen(self, sid: str) -> float | None:
        """Wall time of the last request of ``sid``, if it is a session."""
        return self._last_seen.get(sid)

    def snapshot(self, *, compact: bool = False) -> dict[str, Any]:
        """The view in wire form, with each session's current ``last_seen``.

        With ``compact`` the rows go as ``claim_groups`` (see
        :meth:`ClaimView.snapshot`); that list is built once per claims-stream
        head and shared by every snapshot until the next change: read it, do
        not change it.
        """
        view = self.view
        sessions = [info.to_wire() for info in view.sessions.values()]
        last_seen = self._last_seen
        for data in sessions:
            data["last_seen"] = last_seen.get(data["sid"], data["last_seen"])
        rows: dict[str, Any]
        if compact:
            if self._groups_head != view.head or self._groups is None:
                self._groups = view.claim_groups()
                self._groups_head = view.head
            rows = {"claim_groups": self._groups}
        else:
            rows = {"claims": [row.to_wire() for row in view.claims()]}
        return {
            "head": view.head,
            "sessions": sessions,
            **rows,
            "waiters": [waiter.to_wire() for waiter in view.waiters],
        }

    # -- claims -------------------------------------------------------------

    def claim(
        self,
        sid: str,
        scopes: Iterable[Scope],
        *,
        mode: Mode,
        intent: str,
        ttl_s: float | None,
        wait_s: float | None,
        rid: str,
        now: Now,
    ) -> Outcome:
        """Claim ``scopes`` for ``sid``, all or nothing.

        Granted at once (reply ``{"grant", "fence", "claims"}``), refused with
        :class:`~fleetbus.errors.Conflict`, or, given ``wait_s``, queued
        (``Outcome.queued`` is the position) unless waiting would deadlock.
        """
        self.touch(sid, now)
        waiting = self.view.waiter(sid, rid) if self.view.waiters else None
        if waiting is not None:
            return Outcome([], None, queued=self.view.waiters.index(waiting) + 1)
        wanted = self._check_claim(sid, scopes, mode, intent, ttl_s, wait_s)
        if wait_s:
            targets = self._wait_targets(sid, wanted, mode, len(self.view.waiters))
            if targets:
                cycle = self._find_cycle(sid, targets)
                if cycle is not None:
                    raise self._deadlock(cycle)
                return self._queue(sid, rid, wanted, mode, intent, ttl_s, wait_s, now)
        else:
            held = self.view.conflicts(wanted, mode, sid)
            if held:
                raise _conflict(held)

        out = Outcome([], None)
        out.reply = self._grant(sid, wanted, mode, intent, ttl_s, now, out)
        return out

    def cancel(self, sid: str, rid: str, *, now: Now) -> Outcome:
        """Withdraw the queued claim request ``rid`` of ``sid``.

        Its final reply becomes a refusal and later waits it held back may be
        granted. Reply: ``{"cancelled": bool}``, false when ``rid`` is not
        waiting (already granted, ended, or never queued).
        """
        self.touch(sid, now)
        waiter = self.view.waiter(sid, rid)
        out = Outcome([], {"cancelled": waiter is not None})
        if waiter is not None:
            error = Refused("wait cancelled by its session")
            self._end_wait(waiter, "cancelled", error.to_wire(), out)
            self._drain(now, out)
        return out

    def is_waiting(self, sid: str, rid: str) -> bool:
        """Whether request ``rid`` of ``sid`` is queued, so a retry must not be."""
        return self.view.waiter(sid, rid) is not None

    def release(
        self,
        sid: str,
        *,
        scopes: Iterable[Scope] | None = None,
        grant: str | None = None,
        ids: Iterable[str] | None = None,
        all: bool = False,
        now: Now,
    ) -> Outcome:
        """Release rows of ``sid`` chosen by exactly one selector.

        ``scopes`` releases the session's rows each given scope covers;
        ``grant`` and ``ids`` name rows, and naming another session's row
        raises :class:`~fleetbus.errors.NotOwner`; ``all`` releases every row.
        Scopes that cover none of the session's rows but name another
        session's claim (cover it, or lie within it) raise ``NotOwner`` too;
        one that lies within a row of its own raises ``BadInput``.
        Rows already gone are skipped. Reply: ``{"released": [ids]}``.
        """
        self.touch(sid, now)
        _one_selector(scopes=scopes, grant=grant, ids=ids, all=all or None)
        if scopes is not None:
            given = tuple(scopes)
            rows = [
                row
                for row in self.view.claims(sid)
                if any(scope.covers(row.scope) for scope in given)
            ]
            if not rows:
                self._owned(sid, self._named_by_scope(sid, given))
                self._refuse_partial(sid, given)
        elif all:
            rows = self.view.claims(sid)
        else:
            rows = self._owned(sid, self._named(grant, ids))
        out = Outcome([], {"released": [row.id for row in rows]})
        self._release(sid, rows, "released", out)
        self._drop_if_empty(sid, out)
        self._drain(now, out)
        return out

    def force_release(
        self,
        *,
        scopes: Iterable[Scope] | None = None,
        ids: Iterable[str] | None = None,
        by: str,
        now: Now,
    ) -> Outcome:
        """Release rows of any session, for an operator named ``by``.

        ``scopes`` releases every row a given scope covers; ``ids`` names rows.
        Reply: ``{"released": [ids]}``; the events carry reason ``forced``.
        """
        _one_selector(scopes=scopes, ids=ids)
        if scopes is not None:
            given = tuple(scopes)
            rows = [
                row
                for row in self.view.claims()
                if any(scope.covers(row.scope) for scope in given)
            ]
        else:
            rows = self._named(None, ids)
        out = Outcome([], {"released": [row.id for row in rows]})
        by_sid: dict[str, list[Claim]] = {}
        for row in rows:
            by_sid.setdefault(row.sid, []).append(row)
        for owner, owned in by_sid.items():
            self._release(owner, owned, "forced", out, by=by)
            self._drop_if_empty(owner, out)
        self._drain(now, out)
        return out

    def renew(
        self,
        sid: str,
        *,
        grant: str | None = None,
        ids: Iterable[str] | None = None,
        ttl_s: float,
        now: Now,
    ) -> Outcome:
        """Give rows of ``sid`` a new TTL ending ``ttl_s`` from now.

        Reply: ``{"claims": [rows]}``. Naming no held row is ``BadInput``;
        naming another session's row is ``NotOwner``.
        """
        self.touch(sid, now)
        _one_selector(grant=grant, ids=ids)
        _check_duration("ttl_s", ttl_s)
        named = None if ids is None else list(ids)
        rows = self._owned(sid, self._named(grant, named))
        missing = [cid for cid in named or () if self.view.get(cid) is None]
        if not rows or missing:
            what = ", ".join(missing) or grant or "no ids"
            raise BadInput(f"no held claim to renew: {what}")
        expires = now.wall + ttl_s
        out = Outcome([], None)
        cids = [row.id for row in rows]
        self._emit(
            out, {"type": "claim.renewed", "sid": sid, "ids": cids, "expires": expires}
        )
        for cid in cids:
            heapq.heappush(self._ttl_heap, (expires, cid))
        out.reply = {"claims": [row.to_wire() for row in rows]}
        return out

    # -- time ---------------------------------------------------------------

    def tick(self, now: Now) -> Outcome:
        """Apply the passage of time: lost leases, TTL expiries, wait timeouts.

        Waits unblocked by what was released are granted in the same outcome.
        """
        out = Outcome([], None)
        self._expire_waits(now, out)
        for sid in self._lapsed(now):
            info = self.view.sessions[sid]
            if info.leased:
                self._end_session(sid, "session_lost", out)
            else:
                self._forget(sid, "session_left", out)
        self._expire_ttls(now, out)
        self._drain(now, out)
        return out

    def next_deadline(self) -> float | None:
        """The earliest monotonic time at which :meth:`tick` has work to do.

        Wall-time TTL expiries are given by :meth:`next_ttl`.
        """
        times = [w.deadline for w in self.view.waiters if w.deadline < math.inf]
        due = self._next_lapse()
        if due is not None:
            times.append(due[0])
        return min(times, default=None)

    def next_ttl(self) -> float | None:
        """The earliest wall time at which a claim's TTL runs out."""
        heap = self._ttl_heap
        while heap:
            expires, cid = heap[0]
            row = self.view.get(cid)
            if row is not None and row.expires == expires:
                return expires
            heapq.heappop(heap)
        return None

    def restore(
        self,
        sessions: list[SessionInfo],
        claims: list[Claim],
        *,
        grace_s: float,
        now: Now,
    ) -> None:
        """Load the stored state after a restart, emitting nothing.

        Every session gets a fresh lease plus ``grace_s`` to come back.
        """
        # The index's tree of literal paths is left to the first pattern
        # query or to warm(): a restart with many claims serves sooner.
        view = ClaimView(eager=False)
        view.sessions = {info.sid: info for info in sessions}
        view.granted(claims, self.sequence.head(CLAIMS_STREAM))
        self.view = view
        self._groups = None
        self._deadlines = {
            info.sid: now.mono + info.lease_s + grace_s for info in sessions
        }
        self._armed = dict(self._deadlines)
        self._lease_heap = [(deadline, sid) for sid, deadline in self._armed.items()]
        heapq.heapify(self._lease_heap)
        self._last_seen = {info.sid: info.last_seen for info in sessions}
        self._ttl_heap = [
            (row.expires, row.id) for row in claims if row.expires is not None
        ]
        heapq.heapify(self._ttl_heap)

    # -- internals ----------------------------------------------------------

    def _emit(self, out: Outcome, event: dict[str, Any]) -> dict[str, Any]:
        self.sequence.stamp(CLAIMS_STREAM, event)
        self.view.apply(event)
        out.events.append(event)
        sid = event.get("sid")
        if sid is not None and sid not in self._armed and sid in self._deadlines:
            # An unleased session set aside while busy may be idle now.
            self._arm(sid, self._deadlines[sid])
        return event

    def _arm(self, sid: str, deadline: float) -> None:
        self._armed[sid] = deadline
        heapq.heappush(self._lease_heap, (deadline, sid))

    def _next_lapse(self) -> tuple[float, str] | None:
        """The earliest lease deadline :meth:`tick` must act on, and its session.

        Entries are checked as they come up: one superseded or forgotten is
        dropped, one renewed since moves to its deadline, and an unleased
        session that holds or awaits something is set aside until its next
        event (see :meth:`_emit`).
        """
        heap = self._lease_heap
        while heap:
            armed, sid = heap[0]
            if self._armed.get(sid) != armed:
                heapq.heappop(heap)
                continue
            deadline = self._deadlines[sid]
            if deadline > armed:
                self._armed[sid] = deadline
                heapq.heapreplace(heap, (deadline, sid))
                continue
            if not (self.view.sessions[sid].leased or self._is_idle(sid)):
                heapq.heappop(heap)
                del self._armed[sid]
                continue
            return armed, sid
        return None

    def _session(self, sid: str) -> SessionInfo:
        info = self.view.sessions.get(sid)
        if info is None:
            raise UnknownSession(f"no session {sid!r} in {self.repo}; join first")
        return info

    def _check_claim(
        self,
        sid: str,
        scopes: Iterable[Scope],
        mode: Mode,
        intent: str,
        ttl_s: float | None,
        wait_s: float | None,
    ) -> tuple[Scope, ...]:
        wanted = tuple(dict.fromkeys(scopes))
        limits = self.limits
        _mode(mode)
        if not wanted:
            raise BadInput("a claim needs at least one scope")
        if len(wanted) > limits.scopes_per_claim:
            raise LimitExceeded(
                f"a claim may name {limits.scopes_per_claim} scopes, not {len(wanted)}",
                limit="scopes_per_claim",
            )
        if not isinstance(intent, str):
            raise BadInput("intent must be a string")
        if len(intent) > limits.intent_len:
            raise LimitExceeded(
                f"intent is {len(intent)} characters, over {limits.intent_len}",
                limit="intent_len",
            )
        if ttl_s is not None:
            _check_duration("ttl_s", ttl_s)
        elif not self.view.sessions[sid].leased:
            raise BadInput("a session without a lease must give its claims a TTL")
        if wait_s is not None and not (0 <= wait_s < math.inf):
            raise BadInput(f"wait_s must be a finite number >= 0, not {wait_s!r}")
        if self.view.count(sid) + len(wanted) > limits.claims_per_session:
            raise LimitExceeded(
                f"session {sid} would hold more than "
                f"{limits.claims_per_session} claims",
                limit="claims_per_session",
            )
        return wanted

    def _grant(
        self,
        sid: str,
        scopes: tuple[Scope, ...],
        mode: Mode,
        intent: str,
        ttl_s: float | None,
        now: Now,
        out: Outcome,
    ) -> dict[str, Any]:
        # The fence is the number the granted event is about to be stamped with.
        fence = self.sequence.seq + 1
        grant = f"{self._tag}:{fence}"
        expires = None if ttl_s is None else now.wall + ttl_s
        name = self.view.sessions[sid].name
        # The rows in wire form (Claim.to_wire), built directly.
        rows: list[dict[str, Any]] = [
            {
                "id": f"{grant}.{n}",
                "sid": sid,
                "name": name,
                "scope": scope.text,
                "mode": mode,
                "intent": intent,
                "grant": grant,
                "fence": fence,
                "since": now.wall,
                "expires": expires,
            }
            for n, scope in enumerate(scopes, 1)
        ]
        event = {
            "type": "claim.granted",
            "sid": sid,
            "grant": grant,
            "fence": fence,
            "claims": rows,
        }
        # As _emit, but the view takes the rows from the scopes at hand rather
        # than parsing them back from the event.
        self.sequence.stamp(CLAIMS_STREAM, event)
        self.view.granted(
            [
                Claim(
                    row["id"],
                    sid,
                    name,
                    scope,
                    mode,
                    intent,
                    grant,
                    fence,
                    now.wall,
                    expires,
                )
                for row, scope in zip(rows, scopes, strict=True)
            ],
            self.sequence.seq,
        )
        out.events.append(event)
        if expires is not None:
            for row in rows:
                heapq.heappush(self._ttl_heap, (expires, row["id"]))
        return {"grant": grant, "fence": fence, "claims": [dict(r) for r in rows]}

    def _queue(
        self,
        sid: str,
        rid: str,
        scopes: tuple[Scope, ...],
        mode: Mode,
        intent: str,
        ttl_s: float | None,
        wait_s: float,
        now: Now,
    ) -> Outcome:
        waiter = Waiter(sid, rid, scopes, mode, intent, ttl_s, now.wall, math.inf)
        out = Outcome([], None)
        self._emit(out, {"type": "wait.queued", **waiter.to_wire()})
        queued = self.view.waiters[-1]
        # What only the broker needs stays out of the event, so replicas
        # never see a monotonic time from another machine.
        queued.ttl_s = ttl_s
        queued.deadline = now.mono + wait_s
        out.queued = len(self.view.waiters)
        return out

    def _wait_targets(
        self, sid: str, scopes: tuple[Scope, ...], mode: Mode, before: int
    ) -> set[str]:
        """Sessions a wait of ``sid`` waits for: holders and earlier waiters."""
        targets = {row.sid for row in self.view.conflicts(scopes, mode, sid)}
        for waiter in self.view.waiters[:before]:
            if waiter.sid != sid and waiter.conflicts_with(scopes, mode):
                targets.add(waiter.sid)
        return targets

    def _blocked(self, waiter: Waiter, before: int) -> bool:
        """Whether ``waiter`` waits for anyone: :meth:`_wait_targets`, stopping
        at the first."""
        if self.view.conflicts(waiter.scopes, waiter.mode, waiter.sid):
            return True
        return any(
            earlier.sid != waiter.sid
            and earlier.conflicts_with(waiter.scopes, waiter.mode)
            for earlier in itertools.islice(self.view.waiters, before)
        )

    def _find_cycle(self, sid: str, targets: set[str]) -> list[str] | None:
        """The cycle a new wait of ``sid`` for ``targets`` would close, if any.

        Searched backwards from ``sid``: the sessions that wait for it, those
        that wait for them, until one of ``targets`` is met. Only waits that
        lead to ``sid`` are looked at, so a new wait behind a long queue for
        one file costs one pass over the queue, not one per waiter.
        """
        waiters = self.view.waiters
        holders: dict[int, set[str]] = {}
        towards: dict[str, str] = {sid: sid}
        queue = deque([sid])
        while queue:
            node = queue.popleft()
            holds = self.view.count(node) > 0
            own = [m for m, waiter in enumerate(waiters) if waiter.sid == node]
            for n, waiter in enumerate(waiters):
                if waiter.sid in towards:
                    continue
                if holds:
                    held = holders.get(n)
                    if held is None:
                        rows = self.view.conflicts(
                            waiter.scopes, waiter.mode, waiter.sid
                        )
                        held = holders[n] = {row.sid for row in rows}
                    waits = node in held
                else:
                    waits = False
                waits = waits or any(
                    m < n and waiters[m].conflicts_with(waiter.scopes, waiter.mode)
                    for m in own
                )
                if not waits:
                    continue
                towards[waiter.sid] = node
                if waiter.sid in targets:
                    path = [waiter.sid]
                    while path[-1] != sid:
                        path.append(towards[path[-1]])
                    return [sid, *path[:-1]]
                queue.append(waiter.sid)
        return None

    def _deadlock(self, cycle: list[str]) -> Deadlock:
        names = [self._label(sid) for sid in cycle]
        chain = " waits for ".join([*names, names[0]])
        return Deadlock(f"waiting would deadlock: {chain}", cycle=cycle)

    def _label(self, sid: str) -> str:
        info = self.view.sessions.get(sid)
        return sid if info is None else f"{info.name} (sid {sid})"

    def _named(self, grant: str | None, ids: Iterable[str] | None) -> list[Claim]:
        if grant is not None:
            return self.view.grant_rows(grant)
        found = (self.view.get(cid) for cid in dict.fromkeys(ids or ()))
        return [row for row in found if row is not None]

    def _refuse_partial(self, sid: str, scopes: tuple[Scope, ...]) -> None:
        """A scope inside one of the session's own claims cannot free part of it."""
        for scope in scopes:
            for row in self.view.overlapping(scope):
                if row.sid == sid and row.scope.covers(scope):
                    raise BadInput(
                        f"{scope.text} lies within your claim on {row.scope.text}, "
                        f"which is released whole: release {row.scope.text}"
                    )

    def _named_by_scope(self, sid: str, scopes: tuple[Scope, ...]) -> list[Claim]:
        """Rows of other sessions that ``scopes`` cover or lie within."""
        found: dict[str, Claim] = {}
        for scope in scopes:
            for row in self.view.overlapping(scope):
                if row.sid != sid and (
                    scope.covers(row.scope) or row.scope.covers(scope)
                ):
                    found[row.id] = row
        return sorted(found.values(), key=lambda row: (row.fence, row.id))

    def _owned(self, sid: str, rows: list[Claim]) -> list[Claim]:
        foreign = [row for row in rows if row.sid != sid]
        if foreign:
            raise NotOwner(
                f"only the holder may change a claim: {foreign[0].describe()}",
                holders=[row.holder() for row in foreign],
            )
        return rows

    def _release(
        self, sid: str, rows: list[Claim], reason: str, out: Outcome, **extra: Any
    ) -> None:
        if rows:
            ids = [row.id for row in rows]
            self._emit(
                out,
                {
                    "type": "claim.released",
                    "sid": sid,
                    "ids": ids,
                    "reason": reason,
                    **extra,
                },
            )

    def _end_session(self, sid: str, reason: str, out: Outcome) -> None:
        """Cancel the waits and lease-bound rows of ``sid``, then drop it."""
        for waiter in [w for w in self.view.waiters if w.sid == sid]:
            error = Refused(f"wait cancelled: {reason.replace('_', ' ')}")
            self._end_wait(waiter, "cancelled", error.to_wire(), out)
        rows = list(self.view.claims(sid))
        bound = [row for row in rows if row.expires is None]
        if reason == "session_lost" and rows:
            timed = [row.scope.text for row in rows if row.expires is not None]
            scopes = [row.scope.text for row in bound] + timed
            out.lost.append((self.view.sessions[sid], list(dict.fromkeys(scopes))))
        self._release(sid, bound, reason, out)
        self._forget(sid, reason, out)

    def _forget(self, sid: str, reason: str, out: Outcome) -> None:
        event: dict[str, Any] = {"type": _SESSION_END_EVENT[reason], "sid": sid}
        if reason == "session_lost":
            event["reason"] = "lease_expired"
        self._emit(out, event)
        self._deadlines.pop(sid, None)
        self._armed.pop(sid, None)
        self._last_seen.pop(sid, None)

    def _is_idle(self, sid: str) -> bool:
        """An unleased session that holds nothing and waits for nothing."""
        info = self.view.sessions.get(sid)
        return (
            info is not None
            and not info.leased
            and not self.view.count(sid)
            and not any(w.sid == sid for w in self.view.waiters)
        )

    def _drop_if_empty(self, sid: str, out: Outcome) -> None:
        if self._is_idle(sid):
            self._forget(sid, "session_left", out)

    def _lapsed(self, now: Now) -> list[str]:
        """Leased sessions past their lease, and idle unleased ones past theirs."""
        lapsed = []
        while (due := self._next_lapse()) is not None and due[0] <= now.mono:
            heapq.heappop(self._lease_heap)
            del self._armed[due[1]]
            lapsed.append(due[1])
        return lapsed

    def _expire_ttls(self, now: Now, out: Outcome) -> None:
        expired: dict[str, list[Claim]] = {}
        heap = self._ttl_heap
        while heap and heap[0][0] <= now.wall:
            expires, cid = heapq.heappop(heap)
            row = self.view.get(cid)
            if row is not None and row.expires == expires:
                expired.setdefault(row.sid, []).append(row)
        for sid, rows in expired.items():
            self._release(sid, rows, "ttl_expired", out)
            self._drop_if_empty(sid, out)

    def _expire_waits(self, now: Now, out: Outcome) -> None:
        for waiter in [w for w in self.view.waiters if w.deadline <= now.mono]:
            held = self.view.conflicts(waiter.scopes, waiter.mode, waiter.sid)
            scopes = ", ".join(scope.text for scope in waiter.scopes)
            blocked = "; ".join(row.describe() for row in held)
            error = TimedOut(
                f"gave up waiting for {scopes}"
                + (f": {blocked}" if blocked else ": queued behind earlier waits"),
                holders=[row.holder() for row in held],
            )
            self._end_wait(waiter, "timeout", error.to_wire(), out)

    def _end_wait(
        self,
        waiter: Waiter,
        reason: str,
        error: dict[str, Any],
        out: Outcome,
    ) -> None:
        event = {"type": "wait.ended", "sid": waiter.sid, "rid": waiter.rid}
        self._emit(out, {**event, "reason": reason})
        out.deferred.append((waiter.sid, waiter.rid, {"ok": False, "error": error}))

    def _drain(self, now: Now, out: Outcome) -> None:
        """Grant, in queue order, every wait that is no longer blocked.

        A wait is blocked by a conflicting row of another session or by an
        earlier, still waiting, conflicting request of another session: an
        earlier waiter is never overtaken.
        """
        self._expire_waits(now, out)
        n = 0
        while n < len(self.view.waiters):
            waiter = self.view.waiters[n]
            if self._blocked(waiter, n):
                n += 1
            else:
                self._grant_waiter(waiter, now, out)

    def _grant_waiter(self, waiter: Waiter, now: Now, out: Outcome) -> None:
        limit = self.limits.claims_per_session
        if self.view.count(waiter.sid) + len(waiter.scopes) > limit:
            error = LimitExceeded(
                f"session {waiter.sid} would hold more than {limit} claims",
                limit="claims_per_session",
            )
            self._end_wait(waiter, "cancelled", error.to_wire(), out)
            return
        reply = self._grant(
            waiter.sid,
            waiter.scopes,
            waiter.mode,
            waiter.intent,
            waiter.ttl_s,
            now,
            out,
        )
        event = {"type": "wait.ended", "sid": waiter.sid, "rid": waiter.rid}
        self._emit(out, {**event, "reason": "granted"})
        out.deferred.append((waiter.sid, waiter.rid, {"ok": True, **reply}))


def _conflict(held: list[Claim]) -> Conflict:
    message = "; ".join(row.describe() for row in held)
    return Conflict(message, holders=[row.holder() for row in held])


def _check_duration(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0 < value < math.inf):
        raise BadInput(f"{name} must be a finite number of seconds > 0, not {value!r}")


def _one_selector(**selectors: Any) -> None:
    given = [name for name, value in selectors.items() if value is not None]
    if len(given) != 1:
        names = ", ".join(selectors)
        raise BadInput(f"give exactly one of {names}, not {len(given)}")


__all__ = [
    "MODES",
    "Claim",
    "ClaimTable",
    "ClaimView",
    "Limits",
    "Mode",
    "Now",
    "Outcome",
    "SessionInfo",
    "Waiter",
    "modes_conflict",
]
