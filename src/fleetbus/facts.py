"""Learned facts: what they are, the broker's table of them, and the client feed.

A fact is a short finding a session shares with its siblings, published on one
or more topics. Topics are scopes, so a fact reaches every session whose scopes
overlap one of them, exactly as claims conflict.

Three pure parts live here, with no I/O and no clock reads:

- :class:`Fact`, its wire form and its checks;
- :class:`FactTable`, the broker's retained facts of one repository: publish,
  supersede, retract, expiry, retention and queries by scope overlap;
- :class:`FactStreamTracker` and :class:`FactFeed`, which a subscriber runs to
  merge the retained facts with the live streams, drop repeats and notice a
  missed event.

Each fact event takes one number of the repository's sequence, however many
topics it is published on. Each topic is its own stream: the event published
on it carries in ``prev`` the number of the previous event on that topic.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol, cast

from fleetbus import wire
from fleetbus.errors import BadInput, LimitExceeded, NotOwner, ProtocolError
from fleetbus.scope import Scope, ScopeIndex, overlaps, parse_scope
from fleetbus.sequence import Sequence

__all__ = [
    "BROKER_AUTHOR",
    "KINDS",
    "MAX_BODY_BYTES",
    "Fact",
    "FactEvent",
    "FactFeed",
    "FactLimits",
    "FactOutcome",
    "FactQuery",
    "FactRows",
    "FactStreamTracker",
    "FactTable",
    "FactTooLarge",
    "Kind",
    "MemoryFactRows",
    "StampedEvent",
    "State",
    "StreamHeads",
    "check_body",
    "check_kind",
    "concerns_any",
    "fact_topics",
    "facts_stream",
    "subscription_topics",
]

Kind = Literal["note", "warning", "decision", "gotcha", "question"]
KINDS: tuple[Kind, ...] = ("note", "warning", "decision", "gotcha", "question")

State = Literal["live", "superseded", "retracted", "expired"]
STATES: tuple[State, ...] = ("live", "superseded", "retracted", "expired")

MAX_BODY_BYTES = 4096
"""Most bytes of UTF-8 a fact's text may have, by default."""

BROKER_AUTHOR = "fleetbus"
"""The session id and name of facts the broker publishes itself."""


@dataclass(frozen=True, slots=True)
class FactLimits:
    """Sizes a fact may have and how many facts a repository retains.

    ``max_facts`` and ``max_age_s`` bound the retained facts, live or not;
    ``None`` lifts a bound. The oldest go first, each with an event.
    """

    body_bytes: int = MAX_BODY_BYTES
    topics_per_fact: int = 16
    max_facts: int | None = 100_000
    max_age_s: float | None = 30 * 86_400.0


def check_kind(value: Any) -> Kind:
    """``value`` as a fact kind; :class:`BadInput` if it is not one."""
    if value not in KINDS:
        raise BadInput(
            f"a fact's kind is one of {', '.join(KINDS)}, not {value!r}", field="kind"
        )
    return cast(Kind, value)


class FactTooLarge(LimitExceeded):
    """A fact's text, or its list of topics, is over its limit.

    Refused like any limit (wire code ``limit``), but it is the caller's input
    that is wrong, so a command exits with 2 as for a malformed fact.
    """

    exit_code = 2


def check_body(value: Any, limit: int = MAX_BODY_BYTES) -> str:
    """``value`` as a fact's text: a non-empty string of at most ``limit`` bytes.

    Too long is :class:`FactTooLarge` with ``limit="fact_bytes"``; anything
    else wrong is :class:`BadInput`.
    """
    if not isinstance(value, str):
        raise BadInput("a fact's text must be a string", field="body")
    if not value.strip():
        raise BadInput("a fact's text is empty", field="body")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise FactTooLarge(
            f"a fact's text is {size} bytes of UTF-8, more than {limit}",
            limit="fact_bytes",
            size=size,
            max=limit,
        )
    return value


def _stamp(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@dataclass(slots=True)
class Fact:
    """One learned fact.

    ``seq`` is the sequence number it was published at and ``id`` is derived
    from it; ``changed`` is the number of its last change (its publication,
    or the event that ended it). ``at``, ``expires`` and ``ended_at`` are
    wall times. ``sid`` and ``name`` name the author.
    """

    id: str
    seq: int
    topics: tuple[Scope, ...]
    body: str
    kind: Kind
    sid: str
    name: str
    at: float
    expires: float | None = None
    supersedes: str | None = None
    state: State = "live"
    changed: int = 0
    ended_at: float | None = None
    superseded_by: str | None = None

    @property
    def live(self) -> bool:
        """Whether the fact is neither superseded, retracted nor expired."""
        return self.state == "live"

    def concerns(self, scope: Scope) -> bool:
        """Whether one of the fact's topics overlaps ``scope``."""
        return any(overlaps(topic, scope) for topic in self.topics)

    def to_wire(self) -> dict[str, Any]:
        """The fact as the protocol carries it."""
        return {
            "id": self.id,
            "seq": self.seq,
            "topics": [topic.text for topic in self.topics],
            "body": self.body,
            "kind": self.kind,
            "sid": self.sid,
            "name": self.name,
            "at": self.at,
            "expires": self.expires,
            "supersedes": self.supersedes,
            "state": self.state,
            "changed": self.changed,
            "ended_at": self.ended_at,
            "superseded_by": self.superseded_by,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Fact:
        """Rebuild a fact from its wire form; :class:`ProtocolError` if malformed."""
        try:
            state = data.get("state", "live")
            if state not in STATES:
                raise ValueError(f"unknown state {state!r}")
            seq = int(data["seq"])
            return cls(
                id=str(data["id"]),
                seq=seq,
                topics=tuple(parse_scope(text) for text in data["topics"]),
                body=str(data["body"]),
                kind=check_kind(data["kind"]),
                sid=str(data["sid"]),
                name=str(data["name"]),
                at=float(data["at"]),
                expires=_optional_float(data.get("expires")),
                supersedes=_optional_str(data.get("supersedes")),
                state=state,
                changed=int(data.get("changed") or seq),
                ended_at=_optional_float(data.get("ended_at")),
                superseded_by=_optional_str(data.get("superseded_by")),
            )
        except (KeyError, TypeError, ValueError, BadInput) as exc:
            raise ProtocolError(f"malformed fact: {exc}") from exc

    def describe(self) -> str:
        """One readable line: kind, topics, author, time and text."""
        topics = ", ".join(topic.text for topic in self.topics)
        state = "" if self.live else f" [{self.state}]"
        return (
            f"{self.id} {self.kind}{state} on {topics} by {self.name} "
            f"at {_stamp(self.at)}: {self.body}"
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


# -- topics and streams --------------------------------------------------------


def facts_stream(prefix: tuple[str, ...]) -> str:
    """The sequence stream key of the facts topic with literal ``prefix``."""
    return "facts:" + "/".join(prefix)


def fact_topics(topics: Iterable[Scope]) -> list[tuple[str, ...]]:
    """The distinct literal prefixes, hence PUB topics, a fact is published on."""
    return list(dict.fromkeys(topic.literal_prefix for topic in topics))


def subscription_topics(repo: str, scope: Scope) -> list[bytes]:
    """The SUB prefixes that receive every fact that could overlap ``scope``.

    Facts beneath the scope's literal prefix come by the subtree prefix; facts
    whose own literal prefix is an ancestor (down to the repository root, where
    resources and root-level patterns live) come by exact prefixes.
    """
    prefix = scope.literal_prefix
    topics = [wire.facts_exact(repo, prefix[:n]) for n in range(len(prefix))]
    topics.append(wire.facts_subtree(repo, prefix))
    if scope.is_resource:
        topics = [wire.facts_exact(repo, ())]
    return topics


# -- the broker's table ----------------------------------------------------------


class StampedEvent(NamedTuple):
    """A numbered fact event and, per literal prefix it goes to, its ``prev``."""

    event: dict[str, Any]
    links: list[tuple[tuple[str, ...], int]]

    def copies(self) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
        """The event as published on each of its topics."""
        for prefix, prev in self.links:
            yield prefix, {**self.event, "prev": prev}


@dataclass(slots=True)
class FactOutcome:
    """What a table call changed: events to publish, rows to write or delete.

    ``changed`` holds every fact whose row must be written (new or ended);
    ``dropped`` the ids whose rows must go; ``reply`` the fact to answer with.
    """

    events: list[StampedEvent] = field(default_factory=list)
    changed: list[Fact] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reply: Fact | None = None


class FactQuery(NamedTuple):
    """The filters of a query over retained facts; see :meth:`FactTable.query`."""

    scopes: list[Scope] | None = None
    kind: str | None = None
    author: str | None = None
    since: int | None = None
    since_wall: float | None = None
    changed_since: int | None = None
    ids: set[str] | None = None
    include_history: bool = False
    limit: int = 100

    @property
    def history(self) -> bool:
        """Whether ended facts match too."""
        return self.include_history or self.changed_since is not None

    @property
    def keeps_first(self) -> bool:
        """Whether a query with more matches than its limit keeps the first."""
        return self.since is not None or self.changed_since is not None

    def admits(self, fact: Fact) -> bool:
        """Whether ``fact`` passes every filter but the scopes."""
        return (
            (self.history or fact.live)
            and (self.kind is None or fact.kind == self.kind)
            and (self.author is None or self.author in (fact.sid, fact.name))
            and (self.since is None or fact.seq > self.since)
            and (self.since_wall is None or fact.at >= self.since_wall)
            and (self.changed_since is None or fact.changed > self.changed_since)
            and (self.ids is None or fact.id in self.ids)
        )


def concerns_any(topics: Iterable[Scope], scopes: list[Scope]) -> bool:
    """Whether one of ``topics`` overlaps one of ``scopes``."""
    return any(overlaps(topic, scope) for topic in topics for scope in scopes)


class FactRows(Protocol):
    """Where a :class:`FactTable` keeps its retained facts.

    The table decides; the rows hold facts and answer queries. Facts handed
    to :meth:`add` and :meth:`ended` are final for that change; facts
    returned are the caller's to change and hand back.
    """

    def __len__(self) -> int:
        """The number of retained facts, live or ended."""
        ...

    def over(self, most: int) -> int:
        """How many more than ``most`` facts are retained (0 if not more)."""
        ...

    def get(self, fact_id: str) -> Fact | None:
        """The retained fact ``fact_id``, live or not."""
        ...

    def add(self, fact: Fact) -> Any:
        """Hold a newly published fact; returns its wire form as events carry
        it (the dict of :meth:`Fact.to_wire`, or the same already encoded as
        a JSON fragment that :func:`fleetbus.wire.encode` embeds)."""
        ...

    def ended(self, facts: list[Fact]) -> None:
        """Take the new state of facts that ended."""
        ...

    def remove(self, facts: list[Fact]) -> None:
        """Forget facts."""
        ...

    def oldest(self, count: int, *, at_most: float | None = None) -> list[Fact]:
        """Up to ``count`` facts in order of publication, oldest first; with
        ``at_most``, only up to the first published after that wall time."""
        ...

    def first_at(self) -> float | None:
        """The wall time of the oldest retained fact."""
        ...

    def expiring(self) -> Iterable[tuple[float, str]]:
        """``(expires, id)`` of every live fact with an expiry."""
        ...

    def select(self, query: FactQuery) -> tuple[list[Fact], bool]:
        """The facts matching ``query``, and whether more did."""
        ...

    def concerning(self, scopes: list[Scope]) -> Iterator[Fact]:
        """The live facts with a topic overlapping one of ``scopes``, in order."""
        ...


class StreamHeads(Protocol):
    """Where the heads of the facts streams are kept."""

    def link(self, stream: str, seq: int) -> int:
        """Make ``seq`` the head of ``stream``; return the head it replaces."""
        ...


class MemoryFactRows:
    """Retained facts held in memory: a table on its own, and the reference
    for a stored one."""

    def __init__(self) -> None:
        self._facts: OrderedDict[str, Fact] = OrderedDict()
        self._index: ScopeIndex[str] = ScopeIndex()
        # Fact ids in order of their last change, so that a catch-up query
        # reads only what changed instead of every fact on its scopes.
        self._changes: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._facts)

    def over(self, most: int) -> int:
        return max(0, len(self._facts) - most)

    def __iter__(self) -> Iterator[Fact]:
        return iter(list(self._facts.values()))

    def get(self, fact_id: str) -> Fact | None:
        return self._facts.get(fact_id)

    def add(self, fact: Fact) -> Any:
        self._facts[fact.id] = fact
        self._changes[fact.id] = None
        self._changes.move_to_end(fact.id)
        for topic in fact.topics:
            self._index.add(topic, fact.id)
        return fact.to_wire()

    def ended(self, facts: list[Fact]) -> None:
        for fact in facts:
            self._facts[fact.id] = fact
            self._changes.move_to_end(fact.id)

    def remove(self, facts: list[Fact]) -> None:
        for fact in facts:
            if self._facts.pop(fact.id, None) is None:
                continue
            del self._changes[fact.id]
            for topic in fact.topics:
                self._index.discard(topic, fact.id)

    def sort_changes(self) -> None:
        """Order the changes by ``changed`` (after a restore)."""
        by_change = sorted(self._facts.values(), key=lambda f: f.changed)
        self._changes = OrderedDict((fact.id, None) for fact in by_change)

    def oldest(self, count: int, *, at_most: float | None = None) -> list[Fact]:
        out: list[Fact] = []
        for fact in self._facts.values():
            if len(out) >= count or (at_most is not None and fact.at > at_most):
                break
            out.append(fact)
        return out

    def first_at(self) -> float | None:
        first = next(iter(self._facts.values()), None)
        return None if first is None else first.at

    def expiring(self) -> Iterable[tuple[float, str]]:
        return [
            (fact.expires, fact.id)
            for fact in self._facts.values()
            if fact.live and fact.expires is not None
        ]

    def select(self, query: FactQuery) -> tuple[list[Fact], bool]:
        if query.changed_since is not None:
            candidates = self._changed_after(query.changed_since)
        else:
            candidates = self._candidates(query.scopes)
        scopes = query.scopes if query.changed_since is not None else None
        found = [
            fact
            for fact in candidates
            if query.admits(fact)
            and (scopes is None or concerns_any(fact.topics, scopes))
        ]
        return _page(found, query)

    def concerning(self, scopes: list[Scope]) -> Iterator[Fact]:
        return (fact for fact in self._candidates(scopes) if fact.live)

    def _candidates(self, scopes: Iterable[Scope] | None) -> list[Fact]:
        if scopes is None:
            return list(self._facts.values())
        hits: set[str] = set()
        for scope in scopes:
            hits.update(fact_id for _, fact_id in self._index.overlapping(scope))
        return sorted((self._facts[i] for i in hits), key=lambda fact: fact.seq)

    def _changed_after(self, seq: int) -> list[Fact]:
        """Facts changed after ``seq``, in order of change."""
        recent: list[Fact] = []
        for fact_id in reversed(self._changes):
            fact = self._facts[fact_id]
            if fact.changed <= seq:
                break
            recent.append(fact)
        recent.reverse()
        return recent


def _page(found: list[Fact], query: FactQuery) -> tuple[list[Fact], bool]:
    """At most ``query.limit`` of ``found``: the first or the newest."""
    if len(found) <= query.limit:
        return found, False
    if query.keeps_first:
        return found[: query.limit], True
    return found[len(found) - query.limit :], True


AGE_DROPS_PER_TICK = 10_000
"""Most facts one tick drops for age; the next tick goes on."""


class FactTable:
    """The retained facts of one repository, as the broker keeps them.

    Facts are held in publication order, so the oldest comes first when
    retention drops some. Ended facts stay, as history, until retention drops
    them. A call that raises has changed nothing.

    ``rows`` keeps the facts (in memory by default) and ``heads`` the heads
    of the facts streams (by default the sequence's own); only the expiry
    times of live facts are held by the table itself.
    """

    def __init__(
        self,
        repo: str,
        sequence: Sequence,
        limits: FactLimits | None = None,
        *,
        rows: FactRows | None = None,
        heads: StreamHeads | None = None,
    ) -> None:
        self.repo = repo
        self.sequence = sequence
        self.limits = limits or FactLimits()
        self.rows: FactRows = rows if rows is not None else MemoryFactRows()
        self.heads: StreamHeads = heads if heads is not None else sequence
        # The seq of the last fact event since this table was made (None:
        # none yet, and events before it, from an earlier start, unknown).
        self.last_seq: int | None = None
        self._expiry: list[tuple[float, str]] = list(self.rows.expiring())
        heapq.heapify(self._expiry)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, fact_id: str) -> Fact | None:
        """The retained fact ``fact_id``, live or not."""
        return self.rows.get(fact_id)

    def restore(self, facts: Iterable[Fact]) -> None:
        """Load stored facts into a table kept in memory, emitting nothing."""
        for fact in sorted(facts, key=lambda f: f.seq):
            self.rows.add(fact)
            if fact.live and fact.expires is not None:
                heapq.heappush(self._expiry, (fact.expires, fact.id))
        if isinstance(self.rows, MemoryFactRows):
            self.rows.sort_changes()

    # -- changes ----------------------------------------------------------------

    def publish(
        self,
        sid: str,
        name: str,
        topics: Iterable[Scope],
        body: str,
        *,
        kind: str | None = None,
        ttl_s: float | None = None,
        supersedes: str | None = None,
        now: float,
    ) -> FactOutcome:
        """Publish a fact; reply: the fact as stored.

        With ``supersedes``, the named live fact ends (reason ``superseded``)
        and the new one names it; given no topics or kind, it takes the old
        one's (else the kind is ``note``). Retention by count may then drop
        the oldest facts.
        """
        old = self._live(supersedes) if supersedes is not None else None
        wanted = tuple(dict.fromkeys(topics))
        if not wanted and old is not None:
            wanted = old.topics
        if kind is None:
            kind = "note" if old is None else old.kind
        self._check(wanted, body, kind, ttl_s)
        seq = self.sequence.next_number()
        fact = Fact(
            id=f"f{seq}",
            seq=seq,
            topics=wanted,
            body=body,
            kind=check_kind(kind),
            sid=sid,
            name=name,
            at=now,
            expires=None if ttl_s is None else now + ttl_s,
            supersedes=supersedes,
            changed=seq,
        )
        out = FactOutcome(reply=fact)
        data = self.rows.add(fact)
        if fact.expires is not None:
            heapq.heappush(self._expiry, (fact.expires, fact.id))
        self._emit(
            out, {"type": "fact.published", "seq": seq, "fact": data}, fact.topics
        )
        out.changed.append(fact)
        if old is not None:
            self._end([old], "superseded", now, out, by=fact.id)
        self._retain_count(out)
        return out

    def retract(self, sid: str, fact_id: str, now: float) -> FactOutcome:
        """End a live fact of ``sid`` (reason ``retracted``); reply: the fact.

        Retracting a fact already retracted changes nothing. Only the author may
        retract (:class:`NotOwner`); superseding is open to every session.
        """
        fact = self.rows.get(fact_id)
        if fact is None:
            raise BadInput(f"no fact {fact_id!r} in this repository", field="id")
        if fact.sid != sid:
            raise NotOwner(
                f"only its author {fact.name} (sid {fact.sid}) may retract {fact_id}",
                author=fact.sid,
            )
        if fact.state == "retracted":
            return FactOutcome(reply=fact)
        if not fact.live:
            raise BadInput(f"fact {fact_id} is {fact.state} already", field="id")
        out = FactOutcome(reply=fact)
        self._end([fact], "retracted", now, out, by=sid)
        return out

    def tick(self, now: float) -> FactOutcome:
        """Apply the passage of time: TTL expiry, then retention by age."""
        out = FactOutcome()
        expired: list[Fact] = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires, fact_id = heapq.heappop(heap)
            fact = self.rows.get(fact_id)
            if fact is not None and fact.live and fact.expires == expires:
                expired.append(fact)
        if expired:
            self._end(expired, "expired", now, out)
        max_age = self.limits.max_age_s
        if max_age is not None:
            first = self.rows.first_at()
            if first is not None and first <= now - max_age:
                old = self.rows.oldest(AGE_DROPS_PER_TICK, at_most=now - max_age)
                self._drop(old, "age", out)
        return out

    def next_due(self) -> float | None:
        """The earliest wall time at which :meth:`tick` has work to do."""
        heap = self._expiry
        times = [heap[0][0]] if heap else []
        max_age = self.limits.max_age_s
        if max_age is not None:
            first = self.rows.first_at()
            if first is not None:
                times.append(first + max_age)
        return min(times, default=None)

    # -- queries -----------------------------------------------------------------

    def query(
        self,
        scopes: Iterable[Scope] | None = None,
        *,
        kind: str | None = None,
        author: str | None = None,
        since: int | None = None,
        since_wall: float | None = None,
        changed_since: int | None = None,
        ids: set[str] | None = None,
        include_history: bool = False,
        limit: int = 100,
    ) -> tuple[list[Fact], bool]:
        """The facts that match every filter given, and whether more did.

        ``scopes``: a topic overlaps one of them. ``author``: the author's sid
        or name. ``since``: published after that seq; ``since_wall``: at or
        after that wall time. ``changed_since``: published or ended after that
        seq, history included (how a subscriber catches up). ``ids``: among
        these (a search's hits). Ended facts only with ``include_history``.

        Facts come in order of publication (of change, with ``changed_since``).
        When more than ``limit`` match, a query with ``since`` or
        ``changed_since`` keeps the first ones, so it can page on; otherwise
        it keeps the newest.
        """
        return self.rows.select(
            FactQuery(
                scopes=None if scopes is None else list(scopes),
                kind=kind,
                author=author,
                since=since,
                since_wall=since_wall,
                changed_since=changed_since,
                ids=ids,
                include_history=include_history,
                limit=limit,
            )
        )

    def concerning(self, scopes: Iterable[Scope]) -> Iterator[Fact]:
        """The live facts with a topic overlapping one of ``scopes``, in order."""
        return self.rows.concerning(list(scopes))

    # -- internals ----------------------------------------------------------------

    def _check(
        self, topics: tuple[Scope, ...], body: str, kind: str, ttl_s: float | None
    ) -> None:
        if not topics:
            raise BadInput("a fact needs at least one topic", field="topics")
        most = self.limits.topics_per_fact
        if len(topics) > most:
            raise FactTooLarge(
                f"a fact may have {most} topics, not {len(topics)}",
                limit="topics_per_fact",
            )
        check_body(body, self.limits.body_bytes)
        check_kind(kind)
        if ttl_s is not None and not (0 < ttl_s < math.inf):
            raise BadInput(
                f"a fact's TTL must be a finite number of seconds > 0, not {ttl_s!r}",
                field="ttl_ms",
            )

    def _live(self, fact_id: str) -> Fact:
        fact = self.rows.get(fact_id)
        if fact is None or not fact.live:
            state = "no such fact" if fact is None else f"it is {fact.state}"
            raise BadInput(f"cannot supersede {fact_id!r}: {state}", field="supersedes")
        return fact

    def _emit(
        self,
        out: FactOutcome,
        event: dict[str, Any],
        topics: Iterable[Scope],
    ) -> None:
        seq = int(event["seq"])
        self.last_seq = seq
        link = self.heads.link
        links = [
            (prefix, link(facts_stream(prefix), seq)) for prefix in fact_topics(topics)
        ]
        out.events.append(StampedEvent(event, links))

    def _end(
        self,
        facts: list[Fact],
        reason: State,
        now: float,
        out: FactOutcome,
        by: str | None = None,
    ) -> None:
        """End live facts: one event per distinct set of topics."""
        for group in _by_topics(facts):
            seq = self.sequence.next_number()
            for fact in group:
                fact.state = reason
                fact.changed = seq
                fact.ended_at = now
                if reason == "superseded":
                    fact.superseded_by = by
                out.changed.append(fact)
            self.rows.ended(group)
            event: dict[str, Any] = {
                "type": "fact.ended",
                "seq": seq,
                "reason": reason,
                "ids": [fact.id for fact in group],
                "facts": [fact.to_wire() for fact in group],
            }
            if by is not None:
                event["by"] = by
            self._emit(out, event, group[0].topics)

    def _retain_count(self, out: FactOutcome) -> None:
        most = self.limits.max_facts
        excess = 0 if most is None else self.rows.over(most)
        if excess:
            self._drop(self.rows.oldest(excess), "count", out)

    def _drop(self, facts: list[Fact], limit: str, out: FactOutcome) -> None:
        """Forget facts for retention: one event per distinct set of topics."""
        for group in _by_topics(facts):
            self.rows.remove(group)
            out.dropped.extend(fact.id for fact in group)
            event = {
                "type": "fact.dropped",
                "seq": self.sequence.next_number(),
                "reason": "retention",
                "limit": limit,
                "ids": [fact.id for fact in group],
                "kinds": [fact.kind for fact in group],
            }
            self._emit(out, event, group[0].topics)


def _by_topics(facts: Iterable[Fact]) -> list[list[Fact]]:
    groups: dict[tuple[tuple[str, ...], ...], list[Fact]] = {}
    for fact in facts:
        key = tuple(sorted(fact_topics(fact.topics)))
        groups.setdefault(key, []).append(fact)
    return list(groups.values())


# -- the subscriber's side -----------------------------------------------------------


class Verdict(NamedTuple):
    """What a subscriber should do with one received fact event.

    ``fresh``: it was not applied before (not a copy from another topic, not
    in the retained set). ``missed_after``: events of this stream after that
    seq were lost; fetch what changed since then. ``None`` if nothing was.
    """

    fresh: bool
    missed_after: int | None


class FactStreamTracker:
    """Follows the facts streams a subscriber receives and spots lost events.

    Each subscription prefix is recorded with the sequence number its retained
    set was taken at. On a stream never seen before, the first event's
    ``prev`` may be anything up to that number (older events came with the
    retained set); after that, ``prev`` must be the last ``seq`` seen on the
    stream. An event published on several topics arrives once per topic and
    is fresh once.
    """

    def __init__(self, memory: int = 65_536) -> None:
        self._subscriptions: dict[bytes, int] = {}
        self._last: dict[bytes, int] = {}
        self._applied: OrderedDict[int, None] = OrderedDict()
        self._memory = memory

    def subscribed(self, prefixes: Iterable[bytes], at: int) -> None:
        """Record SUB prefixes whose retained set was taken at seq ``at``."""
        for prefix in prefixes:
            self._subscriptions.setdefault(prefix, at)

    def is_subscribed(self, prefix: bytes) -> bool:
        """Whether ``prefix`` was subscribed already."""
        return prefix in self._subscriptions

    def base(self, topic: bytes) -> int | None:
        """The seq of the earliest retained set covering ``topic``, if any.

        Subscription prefixes are whole topics or end with a separator (see
        :func:`subscription_topics`), so only those prefixes of ``topic`` are
        looked up.
        """
        subscriptions = self._subscriptions
        bases = [subscriptions.get(topic)]
        at = topic.find(wire.SEP)
        while at >= 0:
            bases.append(subscriptions.get(topic[: at + 1]))
            at = topic.find(wire.SEP, at + 1)
        return min((base for base in bases if base is not None), default=None)

    def applied(self, seq: int) -> None:
        """Note that the event numbered ``seq`` was applied (from a query)."""
        self._applied[seq] = None
        self._applied.move_to_end(seq)
        while len(self._applied) > self._memory:
            self._applied.popitem(last=False)

    def check(self, topic: bytes, event: dict[str, Any]) -> Verdict:
        """Judge one event received on ``topic`` and advance the stream."""
        seq, prev = event.get("seq"), event.get("prev")
        if not isinstance(seq, int) or not isinstance(prev, int):
            return Verdict(False, None)
        last = self._last.get(topic)
        if last is None:
            base = self.base(topic)
            if base is None:
                return Verdict(False, None)
            self._last[topic] = seq
            missed = base if prev > base else None
            fresh = seq > base and seq not in self._applied
        else:
            if seq <= last:
                return Verdict(False, None)
            self._last[topic] = seq
            missed = last if prev != last else None
            fresh = seq not in self._applied
        if fresh:
            self.applied(seq)
        return Verdict(fresh, missed)


@dataclass(frozen=True, slots=True)
class FactEvent:
    """A change to a fact, as a subscriber is told of it.

    ``type`` is ``published``, ``superseded``, ``retracted``, ``expired`` or
    ``dropped`` (retention). ``fact`` is the fact as it now stands; a dropped
    fact not known to the subscriber has none. ``by`` names the superseding
    fact or the retracting session.
    """

    type: str
    id: str
    seq: int
    fact: Fact | None = None
    by: str | None = None


class FactFeed:
    """A subscriber's view of the facts of its scopes: what to tell, once.

    Feed it the retained set (:meth:`retained`, also what a catch-up query
    returns) and live events (:meth:`live`); each returns the
    :class:`FactEvent` values to hand to the user, deduplicated by fact id and
    filtered by exact overlap with the subscribed scopes.
    """

    def __init__(self, repo: str, memory: int = 65_536) -> None:
        self.repo = repo
        self.scopes: list[Scope] = []
        # The followed scopes by literal prefix: a fact's topics are checked
        # against those that may overlap them, not against every one.
        self._index: ScopeIndex[Scope] = ScopeIndex()
        self._held: set[Scope] = set()
        self.tracker = FactStreamTracker(memory)
        self._known: OrderedDict[str, State] = OrderedDict()
        self._memory = memory

    def follow(self, scopes: Iterable[Scope]) -> tuple[list[Scope], list[bytes]]:
        """Add scopes; returns those that are new and the SUB prefixes they need."""
        added = [scope for scope in dict.fromkeys(scopes) if scope not in self._held]
        self.scopes.extend(added)
        for scope in added:
            self._held.add(scope)
            self._index.add(scope, scope)
        prefixes: list[bytes] = []
        for scope in added:
            for prefix in subscription_topics(self.repo, scope):
                if prefix not in prefixes and not self.tracker.is_subscribed(prefix):
                    prefixes.append(prefix)
        return added, prefixes

    def wants(self, fact: Fact) -> bool:
        """Whether ``fact`` concerns one of the followed scopes."""
        index = self._index
        return any(
            next(index.overlapping(topic), None) is not None for topic in fact.topics
        )

    def retained(self, facts: Iterable[Fact]) -> list[FactEvent]:
        """Take facts from a query: retained ones, or changes caught up on."""
        out: list[FactEvent] = []
        for fact in facts:
            self.tracker.applied(fact.seq)
            self.tracker.applied(fact.changed)
            out.extend(self._take(fact, fact.changed))
        return out

    def live(
        self, topic: bytes, event: dict[str, Any]
    ) -> tuple[list[FactEvent], int | None]:
        """Take one live event; returns what to tell and, on a gap, the seq to
        catch up from (fetch what changed after it)."""
        verdict = self.tracker.check(topic, event)
        if not verdict.fresh:
            return [], verdict.missed_after
        try:
            return self._decode(event), verdict.missed_after
        except (KeyError, TypeError, ValueError, ProtocolError):
            return [], verdict.missed_after

    def _decode(self, event: dict[str, Any]) -> list[FactEvent]:
        seq = int(event["seq"])
        kind = event.get("type")
        if kind == "fact.published":
            return self._take(Fact.from_wire(event["fact"]), seq)
        if kind == "fact.ended":
            out: list[FactEvent] = []
            for data in event["facts"]:
                out.extend(self._take(Fact.from_wire(data), seq))
            return out
        if kind == "fact.dropped":
            out = []
            for fact_id in event["ids"]:
                if self._known.pop(fact_id, None) is not None:
                    out.append(FactEvent("dropped", str(fact_id), seq))
            return out
        return []

    def _take(self, fact: Fact, seq: int) -> list[FactEvent]:
        known = self._known.get(fact.id)
        if known == fact.state or not self.wants(fact):
            return []
        if fact.live:
            self._remember(fact.id, "live")
            return [FactEvent("published", fact.id, seq, fact)]
        self._remember(fact.id, fact.state)
        if known is None:
            # The end of a fact this subscriber was never shown tells it nothing.
            return []
        by = fact.superseded_by if fact.state == "superseded" else None
        return [FactEvent(fact.state, fact.id, seq, fact, by)]

    def _remember(self, fact_id: str, state: State) -> None:
        self._known[fact_id] = state
        self._known.move_to_end(fact_id)
        while len(self._known) > self._memory:
            self._known.popitem(last=False)
