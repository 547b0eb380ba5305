"""The broker's side of learned facts: requests, persistence, expiry, warnings.

:class:`FactService` plugs into a :class:`~fleetbus.broker.server.Broker`: it
registers the fact operations in the broker's handler table, keeps one
:class:`~fleetbus.facts.FactTable` per repository on the repository's own
sequence, and writes every change in the broker's batch transaction, so a fact
is acknowledged and published only once it is committed. It also watches the
claims stream and, when a session holding claims is lost, publishes a warning
fact of its own on those scopes.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from fleetbus import wire
from fleetbus.broker.store import FACT_REPLIES
from fleetbus.claims import SessionInfo
from fleetbus.errors import BadInput
from fleetbus.facts import (
    BROKER_AUTHOR,
    Fact,
    FactLimits,
    FactOutcome,
    FactQuery,
    FactTable,
    check_body,
    check_kind,
    concerns_any,
)
from fleetbus.scope import Scope, parse_scope

if TYPE_CHECKING:
    from fleetbus.broker.server import Broker
    from fleetbus.broker.store import Store

MAX_QUERY_LIMIT = 10_000
MAX_SEARCH_LEN = 1024
MAX_IDS = 10_000
MAX_ID_LEN = 64
TOPICS_CACHED = 4096
WARNING_TTL_S = 86_400.0
"""How long the broker's own warning about a lost session stays live."""

# A fact is one row of columns; ``id`` and ``body`` (the fact's wire form, as
# readers of the store before this layout know it) are computed, not stored.
_FACTS = """CREATE TABLE IF NOT EXISTS facts (
    n INTEGER PRIMARY KEY,
    repo TEXT NOT NULL,
    seq INTEGER NOT NULL,
    changed INTEGER NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    expires REAL,
    sid TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    topics TEXT NOT NULL,
    text TEXT NOT NULL,
    supersedes TEXT,
    ended_at REAL,
    superseded_by TEXT,
    rid TEXT,
    id TEXT GENERATED ALWAYS AS ('f' || seq) VIRTUAL,
    body TEXT GENERATED ALWAYS AS (json_object(
        'id', 'f' || seq, 'seq', seq, 'topics', json(topics), 'body', text,
        'kind', kind, 'sid', sid, 'name', name, 'at', at, 'expires', expires,
        'supersedes', supersedes, 'state', state, 'changed', changed,
        'ended_at', ended_at, 'superseded_by', superseded_by
    )) VIRTUAL
)"""
_COLUMNS = (
    "seq, changed, state, at, expires, sid, name, kind, topics, text, "
    "supersedes, ended_at, superseded_by"
)
_TABLES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS facts_seq ON facts (repo, seq)",
    "CREATE INDEX IF NOT EXISTS facts_changed ON facts (repo, changed)",
    """CREATE INDEX IF NOT EXISTS facts_expiry ON facts (repo, expires)
        WHERE state = 'live' AND expires IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS fact_topics (
        repo TEXT NOT NULL,
        key TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (repo, key, seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS facts_seen (
        sid TEXT NOT NULL,
        repo TEXT NOT NULL,
        id TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (sid, repo, id)
    )""",
    "CREATE INDEX IF NOT EXISTS facts_seen_fact ON facts_seen (repo, id)",
)
# The full-text index reads the text from the facts table rather than keeping
# a copy of its own; a fact's text never changes once written.
_FTS = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS facts_fts "
    "USING fts5(text, content='facts', content_rowid='n')"
)

_INSERT_FACT = (
    "INSERT INTO facts (n, repo, rid, " + _COLUMNS + ") "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_FTS = "INSERT INTO facts_fts (rowid, text) VALUES (?, ?)"
_INSERT_TOPIC = "INSERT OR IGNORE INTO fact_topics VALUES (?, ?, ?)"
# Run before the fact's row goes: the index needs the text it indexed.
_DELETE_FTS = (
    "INSERT INTO facts_fts (facts_fts, rowid, text) "
    "SELECT 'delete', n, text FROM facts WHERE repo = ? AND seq = ?"
)
_DELETE_FACT = "DELETE FROM facts WHERE repo = ? AND seq = ?"
_DELETE_TOPIC = "DELETE FROM fact_topics WHERE repo = ? AND key = ? AND seq = ?"
_DELETE_SEEN = "DELETE FROM facts_seen WHERE repo = ? AND id = ?"
_PUT_HEAD = "INSERT OR REPLACE INTO heads VALUES (?, ?, ?)"
_PUT_REPLY = "INSERT OR REPLACE INTO fact_replies VALUES (?, ?, ?, ?, ?, ?)"

REPLY_FILTER_BITS = 1 << 25
"""Bits of each window's filter of publishes with a stored reply (4 MiB): a
window of 6 million publishes still leaves nine lookups in ten out."""

HEADS_CACHED = 65_536
"""Most facts stream heads one repository keeps in memory; the rest are read
from the store when their stream moves."""


def topic_key(scope: Scope) -> str:
    """The key a topic is indexed under: its literal prefix, ``/`` after each
    segment (the empty string at the root), or a resource's name."""
    if scope.is_resource:
        return scope.text
    return "".join(name + "/" for name in scope.literal_prefix)


def _scope_clause(repo: str, scopes: list[Scope]) -> tuple[str, list[Any]] | None:
    """SQL (and its arguments) keeping the facts with a topic that may overlap
    one of ``scopes``; ``None`` if any topic may.

    A path topic can overlap a path scope only if one literal prefix starts
    the other: its key is the key of a prefix of the scope's, or begins with
    the scope's key. A resource overlaps only itself. Each part is its own
    search of the topic index.
    """
    parts: list[str] = []
    args: list[Any] = []
    find = "SELECT seq FROM fact_topics WHERE repo = ? AND "
    for scope in scopes:
        if scope.is_resource:
            parts.append(find + "key = ?")
            args.extend([repo, scope.text])
            continue
        prefix = scope.literal_prefix
        if not prefix:
            return None
        keys = ["".join(name + "/" for name in prefix[:n]) for n in range(len(prefix))]
        key = keys[-1] + prefix[-1] + "/"
        marks = ", ".join("?" * len(keys))
        parts.append(find + f"key IN ({marks})")
        # Keys beneath ``key`` sort from it up to its last "/" raised to "0".
        parts.append(find + "key >= ? AND key < ?")
        args.extend([repo, *keys, repo, key, key[:-1] + "0"])
    return f"seq IN ({' UNION ALL '.join(parts)})", args


class _Window:
    """The publishes of one retry window: filter bits, first and newest time."""

    __slots__ = ("bits", "first", "newest")

    def __init__(self, at: float) -> None:
        self.bits = bytearray(REPLY_FILTER_BITS >> 3)
        self.first = at
        self.newest = at


class RecentPublishes:
    """Which publishes (session and request id) may have a stored reply.

    A Bloom filter per retry window: it may say yes of a publish it never
    saw, never no of one it did, so a retry is always found while nearly
    every new publish skips the lookup in the store. The filter of a window
    long past is dropped; a lookup reaching back to the newest publish it
    held cannot be answered here, and says yes.
    """

    def __init__(self) -> None:
        self._windows: list[_Window] = []
        self._dropped_up_to = float("-inf")

    def add(self, sid: str, rid: str, at: float, window_s: float) -> None:
        """Note that the publish ``rid`` of ``sid`` has a reply stored at ``at``."""
        windows = self._windows
        if not windows or at - windows[-1].first > window_s:
            windows.append(_Window(at))
            if len(windows) > 2:
                dropped = windows.pop(0)
                self._dropped_up_to = max(self._dropped_up_to, dropped.newest)
        window = windows[-1]
        window.newest = max(window.newest, at)
        low, high = _bits(sid, rid)
        bits = window.bits
        bits[low >> 3] |= 1 << (low & 7)
        bits[high >> 3] |= 1 << (high & 7)

    def unknown_up_to(self, at: float) -> None:
        """Make the publishes stored up to ``at`` unknown here: a lookup
        reaching back to them says yes."""
        self._dropped_up_to = max(self._dropped_up_to, at)

    def may_hold(self, sid: str, rid: str, since: float) -> bool:
        """Whether a reply to ``rid`` of ``sid`` stored at ``since`` or later
        may exist."""
        if since <= self._dropped_up_to:
            return True
        low, high = _bits(sid, rid)
        for window in self._windows:
            bits = window.bits
            if (
                window.newest >= since
                and bits[low >> 3] & (1 << (low & 7))
                and bits[high >> 3] & (1 << (high & 7))
            ):
                return True
        return False


def _bits(sid: str, rid: str) -> tuple[int, int]:
    """The two filter bits of a publish."""
    h = hash((sid, rid))
    return h & (REPLY_FILTER_BITS - 1), (h >> 25) & (REPLY_FILTER_BITS - 1)


def _seq_of(fact_id: str) -> int | None:
    """The sequence number in a fact id (``f`` + seq), if it is one."""
    digits = fact_id[1:]
    if fact_id[:1] != "f" or not digits.isdigit() or not digits.isascii():
        return None
    return int(digits)


def _fact(row: tuple[Any, ...]) -> Fact:
    """A fact from its columns (:data:`_COLUMNS`)."""
    seq, changed, state, at, expires, sid, name, kind, topics, text = row[:10]
    return Fact(
        id=f"f{seq}",
        seq=seq,
        topics=tuple(parse_scope(topic) for topic in orjson.loads(topics)),
        body=text,
        kind=kind,
        sid=sid,
        name=name,
        at=at,
        expires=expires,
        supersedes=row[10],
        state=state,
        changed=changed,
        ended_at=row[11],
        superseded_by=row[12],
    )


def _as_published(fact: Fact) -> Fact:
    """The fact as it stood when it was published."""
    return dataclasses.replace(
        fact, state="live", changed=fact.seq, ended_at=None, superseded_by=None
    )


class FactStore:
    """The facts, their topics, full-text index and ``seen`` marks, in SQLite.

    Uses the broker store's connection, inside the broker's transaction. New
    facts, their index rows and stream heads are deferred rows of the batch;
    until they are written (:meth:`Store.flush`) the facts stay at hand here,
    so that reading them needs no early write. Full-text search uses FTS5
    when SQLite has it, else ``LIKE``. A store whose facts were kept as
    whole JSON documents (schema 2) is migrated when opened.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = db = store.db
        # A store opened by one earlier version indexes new facts by trigger.
        db.execute("DROP TRIGGER IF EXISTS facts_fts_insert")
        replies = [row[1] for row in db.execute("PRAGMA table_info(fact_replies)")]
        if "seq" not in replies:
            # An earlier layout kept whole replies: retry memory, not state.
            db.execute("DROP TABLE IF EXISTS fact_replies")
            db.executescript(FACT_REPLIES)
        columns = [row[1] for row in db.execute("PRAGMA table_xinfo(facts)")]
        if columns and "state" not in columns:
            self._migrate()
        else:
            db.execute(_FACTS)
            for statement in _TABLES:
                db.execute(statement)
        self.fts = self._open_search()
        self._pending: dict[tuple[str, int], Fact] = {}
        self._flushes = store.flushes
        self.rid: str | None = None
        """The id of the publish request being applied, kept with its fact."""
        self.wall: Callable[[], float] = time.time
        self.reply_window_s = 600.0
        self._next_n = (db.execute("SELECT max(n) FROM facts").fetchone()[0] or 0) + 1
        self.recent = RecentPublishes()
        # Replies stored before this opening are not read into the filter:
        # that would cost a restart a microsecond per publish of the window.
        # Lookups reaching back to them go to the store until they age out.
        newest = db.execute("SELECT max(at) FROM fact_replies").fetchone()[0]
        if newest is not None:
            self.recent.unknown_up_to(newest)

    def _open_search(self) -> bool:
        """Open the full-text index on the facts' own text; whether SQLite has
        FTS5.

        An index keeping its own copy of the text (as earlier layouts did) is
        rebuilt as one that reads the text from the facts table.
        """
        db = self.db
        row = db.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'facts_fts'"
        ).fetchone()
        if row is not None and "content=" in row[0]:
            return True
        try:
            db.execute("DROP TABLE IF EXISTS facts_fts")
            db.execute(_FTS)
        except sqlite3.OperationalError:
            return False
        db.execute("INSERT INTO facts_fts (facts_fts) VALUES ('rebuild')")
        return True

    def _migrate(self) -> None:
        """Give every fact of a schema-2 store (one JSON document each) its
        columns and topic keys.

        The rows keep their numbers.
        """
        db = self.db
        self.store.begin()
        try:
            db.execute("ALTER TABLE facts RENAME TO facts_v2")
            db.execute(_FACTS)
            for statement in _TABLES:
                db.execute(statement)
            rows = db.execute("SELECT n, repo, body FROM facts_v2 ORDER BY n")
            for n, repo, body in rows.fetchall():
                fact = Fact.from_wire(orjson.loads(body))
                db.execute(_INSERT_FACT, _fact_row(n, repo, None, fact))
                db.executemany(
                    _INSERT_TOPIC,
                    [(repo, topic_key(topic), fact.seq) for topic in fact.topics],
                )
            db.execute("DROP TABLE facts_v2")
        except BaseException:
            self.store.rollback()
            raise
        self.store.commit()

    # -- the batch ------------------------------------------------------------------

    def _current(self) -> dict[tuple[str, int], Fact]:
        """The facts added but not yet written; forgotten once the batch is."""
        if self.store.flushes != self._flushes:
            self._pending.clear()
            self._flushes = self.store.flushes
        return self._pending

    def settle(self) -> None:
        """Write the batch's deferred rows, so that SQL reads see them."""
        if self.store.deferred:
            self.store.flush()

    def pending(self, repo: str, seq: int) -> Fact | None:
        """The fact ``seq`` of ``repo`` if it was added and is not yet written."""
        return self._current().get((repo, seq))

    def unwritten(self) -> int:
        """How many added facts are not yet written."""
        return len(self._current())

    def add(self, repo: str, fact: Fact) -> orjson.Fragment:
        """Defer the rows of a new fact; returns its wire form, encoded."""
        n = self._next_n
        self._next_n += 1
        store = self.store
        store.defer(_INSERT_FACT, _fact_row(n, repo, self.rid, fact))
        if self.fts:
            store.defer(_INSERT_FTS, (n, fact.body))
        for topic in fact.topics:
            store.defer(_INSERT_TOPIC, (repo, topic_key(topic), fact.seq))
        self._current()[(repo, fact.seq)] = fact
        return orjson.Fragment(orjson.dumps(fact.to_wire()))

    def ended(self, repo: str, facts: list[Fact]) -> None:
        """Write the new state of facts that ended."""
        if any((repo, fact.seq) in self._current() for fact in facts):
            self.store.flush()
        self.store.begin()
        self.db.executemany(
            "UPDATE facts SET changed = ?, state = ?, ended_at = ?, "
            "superseded_by = ? WHERE repo = ? AND seq = ?",
            [_end_row(repo, fact) for fact in facts],
        )

    def remove(self, repo: str, facts: list[Fact]) -> None:
        """Defer forgetting facts, their index entries and who has seen them."""
        if any((repo, fact.seq) in self._current() for fact in facts):
            self.store.flush()
        self._keep_replies(repo, facts)
        store = self.store
        for fact in facts:
            if self.fts:
                store.defer(_DELETE_FTS, (repo, fact.seq))
            store.defer(_DELETE_FACT, (repo, fact.seq))
            for topic in fact.topics:
                store.defer(_DELETE_TOPIC, (repo, topic_key(topic), fact.seq))
            store.defer(_DELETE_SEEN, (repo, fact.id))

    # -- reads ------------------------------------------------------------------------

    def count(self, repo: str) -> int:
        """How many facts ``repo`` retains."""
        self.settle()
        row = self.db.execute("SELECT count(*) FROM facts WHERE repo = ?", (repo,))
        return int(row.fetchone()[0])

    def span(self, repo: str) -> int:
        """How many numbers lie from the first stored fact of ``repo`` to the
        last: at least how many facts it retains."""
        self.settle()
        first = self.db.execute(
            "SELECT seq FROM facts WHERE repo = ? ORDER BY seq LIMIT 1", (repo,)
        ).fetchone()
        last = self.db.execute(
            "SELECT seq FROM facts WHERE repo = ? ORDER BY seq DESC LIMIT 1", (repo,)
        ).fetchone()
        return 0 if first is None else int(last[0]) - int(first[0]) + 1

    def holds(self, repo: str) -> bool:
        """Whether ``repo`` has a stored fact."""
        self.settle()
        row = self.db.execute("SELECT 1 FROM facts WHERE repo = ? LIMIT 1", (repo,))
        return row.fetchone() is not None

    def get(self, repo: str, seq: int) -> Fact | None:
        """The stored fact ``seq`` of ``repo``."""
        fact = self.pending(repo, seq)
        if fact is not None:
            return fact
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM facts WHERE repo = ? AND seq = ?", (repo, seq)
        ).fetchone()
        return None if row is None else _fact(row)

    def rows(self, repo: str, where: str, args: list[Any], order: str) -> Any:
        """A cursor over the columns (:data:`_COLUMNS`) of the facts of
        ``repo`` matching the SQL condition ``where``, in ``order``."""
        self.settle()
        return self.db.execute(
            f"SELECT {_COLUMNS} FROM facts WHERE repo = ? AND {where} ORDER BY {order}",
            (repo, *args),
        )

    def search(self, repo: str, text: str) -> set[str]:
        """Ids of the facts of ``repo`` whose text has every word of ``text``.

        With FTS5 a word matches whole words it starts (``auth`` finds
        ``authentication``); with ``LIKE`` it matches anywhere in the text.
        """
        words = text.split()
        if not words:
            return set()
        self.settle()
        if self.fts:
            query = " ".join('"' + word.replace('"', '""') + '"*' for word in words)
            rows = self.db.execute(
                "SELECT f.id FROM facts_fts JOIN facts AS f ON f.n = facts_fts.rowid "
                "WHERE facts_fts MATCH ? AND f.repo = ?",
                (query, repo),
            )
        else:
            clause = " AND ".join("text LIKE ? ESCAPE '\\'" for _ in words)
            patterns = [f"%{_escape_like(word)}%" for word in words]
            rows = self.db.execute(
                f"SELECT id FROM facts WHERE repo = ? AND {clause}", (repo, *patterns)
            )
        return {fact_id for (fact_id,) in rows}

    def seen(self, sid: str, repo: str) -> set[str]:
        """Ids of the facts of ``repo`` that session ``sid`` has been shown."""
        self.store.flush()
        rows = self.db.execute(
            "SELECT id FROM facts_seen WHERE sid = ? AND repo = ?", (sid, repo)
        )
        return {fact_id for (fact_id,) in rows}

    def mark_seen(self, sid: str, repo: str, ids: Iterable[str], at: float) -> None:
        """Record that session ``sid`` has been shown these facts."""
        for fact_id in ids:
            self.store.defer(
                "INSERT OR IGNORE INTO facts_seen VALUES (?, ?, ?, ?)",
                (sid, repo, fact_id, at),
            )

    # -- stream heads and replies ---------------------------------------------------

    def head(self, repo: str, stream: str) -> int:
        """The stored head of a facts stream (0 before its first event)."""
        row = self.db.execute(
            "SELECT seq FROM heads WHERE repo = ? AND stream = ?", (repo, stream)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def put_head(self, repo: str, stream: str, seq: int) -> None:
        """Write a stream's head in this batch (the last one given wins)."""
        self.store.put(_PUT_HEAD, (repo, stream), (repo, stream, seq))

    def reply(self, sid: str, rid: str, since: float) -> bytes | None:
        """The first reply to a publish recorded after ``since``, if any.

        The reply is rebuilt from its fact, as published; only for a fact
        dropped within the retry window is the reply itself kept.
        """
        if not self.recent.may_hold(sid, rid, since):
            return None
        row = self.store.pending(_PUT_REPLY, (sid, rid))
        if row is None:
            row = self.db.execute(
                "SELECT * FROM fact_replies WHERE sid = ? AND rid = ? AND at >= ?",
                (sid, rid, since),
            ).fetchone()
        if row is None:
            return None
        _sid, _rid, _at, repo, seq, kept = row
        if kept is not None:
            return bytes(kept)
        fact = self.get(repo, seq)
        if fact is None:
            return None
        return publish_reply(rid, _as_published(fact).to_wire(), seq)

    def put_reply(self, sid: str, rid: str, at: float, repo: str, seq: int) -> None:
        """Remember which fact a publish published, for retries, in this batch."""
        self.recent.add(sid, rid, at, self.reply_window_s)
        self.store.put(_PUT_REPLY, (sid, rid), (sid, rid, at, repo, seq, None))

    def _keep_replies(self, repo: str, facts: list[Fact]) -> None:
        """Keep the replies of publishes still in the retry window whose facts
        are being dropped."""
        horizon = self.wall() - self.reply_window_s
        for fact in facts:
            if fact.at < horizon:
                continue
            row = self.db.execute(
                "SELECT rid FROM facts WHERE repo = ? AND seq = ?", (repo, fact.seq)
            ).fetchone()
            if row is None or row[0] is None:
                continue
            rid = str(row[0])
            reply = publish_reply(rid, _as_published(fact).to_wire(), fact.seq)
            self.recent.add(fact.sid, rid, fact.at, self.reply_window_s)
            self.store.put(
                _PUT_REPLY,
                (fact.sid, rid),
                (fact.sid, rid, fact.at, repo, fact.seq, reply),
            )


def publish_reply(rid: str, fact: Any, seq: int) -> bytes:
    """The encoded reply to the publish ``rid``; ``fact`` is the published
    fact's wire form (a dict, or encoded as an orjson fragment)."""
    return wire.encode(wire.ok(rid, fact=fact, seq=seq))


def _fact_row(n: int, repo: str, rid: str | None, fact: Fact) -> tuple[Any, ...]:
    topics = orjson.dumps([topic.text for topic in fact.topics]).decode()
    return (
        n,
        repo,
        rid,
        fact.seq,
        fact.changed,
        fact.state,
        fact.at,
        fact.expires,
        fact.sid,
        fact.name,
        fact.kind,
        topics,
        fact.body,
        fact.supersedes,
        fact.ended_at,
        fact.superseded_by,
    )


def _end_row(repo: str, fact: Fact) -> tuple[Any, ...]:
    return (fact.changed, fact.state, fact.ended_at, fact.superseded_by, repo, fact.seq)


def _escape_like(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class StoredFacts:
    """The retained facts of one repository, kept in the store.

    Only their number, the wall time of the oldest and the last number
    dropped are held in memory; a query reads the rows it needs. Retention
    drops the oldest first, so every retained fact is numbered above the last
    one dropped, whether or not its deletion is written yet. Implements
    :class:`~fleetbus.facts.FactRows`.
    """

    def __init__(self, store: FactStore, repo: str) -> None:
        self.store = store
        self.repo = repo
        # Counting a large table takes a while, so a restart only bounds the
        # count by the span of numbers; it is counted when the bound is over
        # the retention limit, then kept.
        self._count: int | None = None
        self._bound = store.span(repo)
        self._floor = 0
        self._first_at: float | None = None
        self._first_known = False

    def __len__(self) -> int:
        if self._count is None:
            self._count = self._bound = self.store.count(self.repo)
        return self._count

    def over(self, most: int) -> int:
        if self._count is None and self._bound <= most:
            return 0
        return max(0, len(self) - most)

    def get(self, fact_id: str) -> Fact | None:
        seq = _seq_of(fact_id)
        if seq is None or seq <= self._floor:
            return None
        return self.store.get(self.repo, seq)

    def add(self, fact: Fact) -> orjson.Fragment:
        data = self.store.add(self.repo, fact)
        if not self._bound:
            self._first_at, self._first_known = fact.at, True
        self._bound += 1
        if self._count is not None:
            self._count += 1
        return data

    def ended(self, facts: list[Fact]) -> None:
        self.store.ended(self.repo, facts)

    def remove(self, facts: list[Fact]) -> None:
        self.store.remove(self.repo, facts)
        self._bound -= len(facts)
        if self._count is not None:
            self._count -= len(facts)
        self._floor = max([self._floor, *(fact.seq for fact in facts)])
        self._first_known = False

    def oldest(self, count: int, *, at_most: float | None = None) -> list[Fact]:
        out: list[Fact] = []
        if count <= 0:
            return out
        # Facts not yet written are the newest: the oldest are in the store.
        if count > len(self) - self.store.unwritten():
            self.store.settle()
        rows = self.store.db.execute(
            f"SELECT {_COLUMNS} FROM facts WHERE repo = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (self.repo, self._floor, count),
        )
        for row in rows:
            if at_most is not None and row[3] > at_most:
                break
            out.append(_fact(row))
        return out

    def first_at(self) -> float | None:
        if not self._first_known:
            row = self._first()
            if row is None and self.store.unwritten():
                self.store.settle()
                row = self._first()
            self._first_at = None if row is None else float(row[0])
            self._first_known = True
        return self._first_at

    def _first(self) -> tuple[float] | None:
        # Facts not yet written are the newest: if any is in the store, the
        # oldest is.
        row: tuple[float] | None = self.store.db.execute(
            "SELECT at FROM facts WHERE repo = ? AND seq > ? ORDER BY seq LIMIT 1",
            (self.repo, self._floor),
        ).fetchone()
        return row

    def expiring(self) -> Iterable[tuple[float, str]]:
        self.store.settle()
        return self.store.db.execute(
            "SELECT expires, id FROM facts "
            "WHERE repo = ? AND state = 'live' AND expires IS NOT NULL",
            (self.repo,),
        ).fetchall()

    def select(self, query: FactQuery) -> tuple[list[Fact], bool]:
        where, args = _filters(query)
        scopes = query.scopes
        clause = None if scopes is None else _scope_clause(self.repo, scopes)
        if clause is not None:
            where.append(clause[0])
            args.extend(clause[1])
        order = "changed" if query.changed_since is not None else "seq"
        if not query.keeps_first:
            order += " DESC"
        found: list[Fact] = []
        cursor = self.store.rows(self.repo, " AND ".join(where), args, order)
        for row in cursor:
            if scopes is not None and not _concerns(row[8], scopes):
                continue
            found.append(_fact(row))
            if len(found) > query.limit:
                break
        more = len(found) > query.limit
        found = found[: query.limit]
        if not query.keeps_first:
            found.reverse()
        return found, more

    def concerning(self, scopes: list[Scope]) -> Iterator[Fact]:
        where, args = ["state = 'live'"], []
        clause = _scope_clause(self.repo, scopes)
        if clause is not None:
            where.append(clause[0])
            args.extend(clause[1])
        cursor = self.store.rows(self.repo, " AND ".join(where), args, "seq")
        try:
            for row in cursor:
                if _concerns(row[8], scopes):
                    yield _fact(row)
        finally:
            cursor.close()


def _filters(query: FactQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if not query.history:
        where.append("state = 'live'")
    if query.kind is not None:
        where.append("kind = ?")
        args.append(query.kind)
    if query.author is not None:
        where.append("(sid = ? OR name = ?)")
        args.extend([query.author, query.author])
    if query.since is not None:
        where.append("seq > ?")
        args.append(query.since)
    if query.since_wall is not None:
        where.append("at >= ?")
        args.append(query.since_wall)
    if query.changed_since is not None:
        where.append("changed > ?")
        args.append(query.changed_since)
    if query.ids is not None:
        seqs = [seq for seq in map(_seq_of, query.ids) if seq is not None]
        where.append("seq IN (SELECT value FROM json_each(?))")
        args.append(orjson.dumps(seqs).decode())
    if not where:
        where.append("1")
    return where, args


def _concerns(topics: str, scopes: list[Scope]) -> bool:
    return concerns_any((parse_scope(text) for text in orjson.loads(topics)), scopes)


class StoredHeads:
    """The heads of one repository's facts streams, kept in the store.

    The heads of recently moved streams are held in memory, at most
    :data:`HEADS_CACHED`; the rest are read when their stream moves. Implements
    :class:`~fleetbus.facts.StreamHeads`.
    """

    def __init__(self, store: FactStore, repo: str) -> None:
        self.store = store
        self.repo = repo
        self._heads: dict[str, int] = {}

    def link(self, stream: str, seq: int) -> int:
        heads = self._heads
        prev = heads.get(stream)
        if prev is None:
            if len(heads) >= HEADS_CACHED:
                # Heads moved in this batch must be in the store before
                # they leave memory.
                self.store.store.flush()
                heads.clear()
            prev = self.store.head(self.repo, stream)
        heads[stream] = seq
        self.store.put_head(self.repo, stream, seq)
        return prev


class FactService:
    """The fact operations of one broker, and its fact tables."""

    def __init__(self, broker: Broker, limits: FactLimits | None = None) -> None:
        self.broker = broker
        self.limits = limits or FactLimits(
            max_facts=broker.config.facts_max,
            max_age_s=broker.config.facts_max_age_s,
        )
        self.tables: dict[str, FactTable] = {}
        self.store: FactStore | None = None
        self._topics: dict[tuple[str, tuple[str, ...]], bytes] = {}
        broker._handlers.update(
            {
                "publish": self._on_publish,
                "facts": self._on_facts,
                "retract": self._on_retract,
                "unseen": self._on_unseen,
                "seen": self._on_seen,
            }
        )

    # -- state ------------------------------------------------------------------

    def restore(self) -> None:
        """Open the stored facts on the broker's freshly restored sequences.

        Nothing per fact is loaded: each repository's table reads its facts
        from the store when asked, and holds only the expiry times.
        """
        assert self.broker.store is not None
        self.store = FactStore(self.broker.store)
        self.store.wall = self.broker.clock.wall
        self.store.reply_window_s = self.broker.config.request_memory_s
        self.tables.clear()
        for repo in list(self.broker.sequences):
            if self.store.holds(repo):
                self._table(repo)

    def _table(self, repo: str) -> FactTable:
        table = self.tables.get(repo)
        if table is None:
            assert self.store is not None
            self.broker._table(repo)
            table = FactTable(
                repo,
                self.broker.sequences[repo],
                self.limits,
                rows=StoredFacts(self.store, repo),
                heads=StoredHeads(self.store, repo),
            )
            self.tables[repo] = table
        return table

    def next_due(self, repo: str) -> float | None:
        """The earliest wall time at which a fact of ``repo`` expires or ages
        out."""
        table = self.tables.get(repo)
        return None if table is None else table.next_due()

    def tick(self, repo: str, wall: float) -> None:
        """Expire ``repo``'s facts whose TTL ran out and drop those past the
        age bound."""
        table = self.tables.get(repo)
        if table is None:
            return
        due = table.next_due()
        if due is not None and due <= wall:
            self._absorb(repo, table.tick(wall))

    def _absorb(self, repo: str, outcome: FactOutcome) -> None:
        """Queue an outcome's events; its rows are in the batch already."""
        broker = self.broker
        broker.changed(repo)
        if not outcome.events:
            return
        broker.store_begin()
        broker._dirty.add(repo)
        wall = broker.clock.wall()
        events = broker._events
        logged = broker._log_changes
        for stamped in outcome.events:
            stamped.event["repo"] = repo
            stamped.event.setdefault("at", wall)
            if logged:
                self._log(stamped.event, outcome.reply)
            for prefix, event in stamped.copies():
                events.append((self._topic(repo, prefix), event))

    def _topic(self, repo: str, prefix: tuple[str, ...]) -> bytes:
        key = (repo, prefix)
        topic = self._topics.get(key)
        if topic is None:
            if len(self._topics) >= TOPICS_CACHED:
                self._topics.clear()
            topic = self._topics[key] = wire.facts_topic(repo, prefix)
        return topic

    def _log(self, event: dict[str, Any], fact: Fact | None) -> None:
        """Log an event; ``fact`` is the one a ``fact.published`` announces."""
        fields: dict[str, Any] = {"repo": event["repo"], "seq": event["seq"]}
        if event["type"] == "fact.published":
            assert fact is not None
            fields.update(id=fact.id, sid=fact.sid, kind=fact.kind)
        else:
            fields.update(ids=event["ids"], reason=event.get("limit", event["reason"]))
        self.broker.log_change(event["type"], **fields)

    # -- the broker's own warnings --------------------------------------------------

    def warn_lost(self, repo: str, lost: list[tuple[SessionInfo, list[str]]]) -> None:
        """Warn, as facts on their scopes, about sessions lost holding claims."""
        for info, scopes in lost:
            self._warn_lost(repo, info, scopes)

    def _warn_lost(self, repo: str, info: SessionInfo, scopes: list[str]) -> None:
        sid, name, meta = info.sid, info.name, info.meta
        worktree = meta.get("worktree") or "an unknown worktree"
        branch = meta.get("branch") or "an unknown branch"
        host = meta.get("host") or "an unknown host"
        table = self._table(repo)
        most = self.limits.topics_per_fact
        for start in range(0, len(scopes), most):
            chunk = scopes[start : start + most]
            body = (
                f"Session {name} (sid {sid}) was lost: its lease ran out while it "
                f"held {', '.join(chunk)}. Its worktree {worktree} on branch "
                f"{branch} (host {host}) may still hold uncommitted changes there; "
                "look before editing."
            )
            outcome = table.publish(
                BROKER_AUTHOR,
                BROKER_AUTHOR,
                [parse_scope(text) for text in chunk],
                _clip(body, self.limits.body_bytes),
                kind="warning",
                ttl_s=WARNING_TTL_S,
                now=self.broker.clock.wall(),
            )
            self._absorb(repo, outcome)

    # -- handlers ---------------------------------------------------------------

    def _on_publish(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        broker = self.broker
        sid, claims = broker._session(message)
        if broker._replay(ident, sid, rid) or self._replay(ident, sid, rid):
            return
        raw = message.get("topics")
        supersedes = _optional_id(message, "supersedes")
        topics = _scopes(raw, "topics", required=supersedes is None)
        ttl = message.get("ttl_ms")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0
        ):
            raise BadInput(
                "'ttl_ms' must be a number of milliseconds > 0", field="ttl_ms"
            )
        body = check_body(message.get("body"), self.limits.body_bytes)
        table = self._table(claims.repo)
        assert self.store is not None
        self.store.rid = rid
        try:
            outcome = table.publish(
                sid,
                claims.view.sessions[sid].name,
                topics,
                body,
                kind=_optional_kind(message),
                ttl_s=None if ttl is None else float(ttl) / 1000,
                supersedes=supersedes,
                now=broker.clock.wall(),
            )
        finally:
            self.store.rid = None
        self._absorb(claims.repo, outcome)
        assert outcome.reply is not None
        seq = outcome.reply.seq
        encoded = publish_reply(rid, outcome.events[0].event["fact"], seq)
        # Remembered in the store only, by the fact it published: replies
        # held in memory for the whole retry window would outweigh the facts.
        self.store.put_reply(sid, rid, outcome.reply.at, claims.repo, seq)
        broker._outbox.append((ident, rid, encoded))

    def _replay(self, ident: bytes, sid: str, rid: str) -> bool:
        """Answer a retried publish with its first reply, from the store."""
        assert self.store is not None
        broker = self.broker
        since = broker.clock.wall() - broker.config.request_memory_s
        known = self.store.reply(sid, rid, since)
        if known is None:
            return False
        broker._outbox.append((ident, rid, known))
        return True

    def _on_retract(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        broker = self.broker
        sid, claims = broker._session(message)
        if broker._replay(ident, sid, rid):
            return
        fact_id = _optional_id(message, "id")
        if fact_id is None:
            raise BadInput("retract needs the fact's 'id'", field="id")
        table = self._table(claims.repo)
        outcome = table.retract(sid, fact_id, broker.clock.wall())
        self._absorb(claims.repo, outcome)
        assert outcome.reply is not None
        reply = {"fact": outcome.reply.to_wire(), "seq": outcome.reply.changed}
        broker._reply(ident, rid, reply, remember=(sid, rid))

    def _on_facts(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        broker = self.broker
        if message.get("repo") is not None:
            repo = _string(message, "repo", 512)
            broker.check_repo(message, repo)
        else:
            repo = broker._session(message)[1].repo
        scopes = message.get("scopes")
        search = message.get("search")
        ids = None
        if search is not None:
            text = _string(message, "search", MAX_SEARCH_LEN)
            assert self.store is not None
            ids = self.store.search(repo, text)
        wanted = None if scopes is None else _scopes(scopes, "scopes")
        kind = _optional_kind(message)
        author = _optional_string(message, "author", 128)
        since = _optional_int(message, "since")
        since_wall = _optional_number(message, "since_time")
        changed_since = _optional_int(message, "changed_since")
        history = _flag(message, "include_history", False)
        limit = _limit(message)
        table = self.tables.get(repo)
        sequence = broker.sequences.get(repo)
        found: list[Fact] = []
        more = False
        if table is not None:
            found, more = table.query(
                wanted,
                kind=kind,
                author=author,
                since=since,
                since_wall=since_wall,
                changed_since=changed_since,
                ids=ids,
                include_history=history,
                limit=limit,
            )
        broker._reply(
            ident,
            rid,
            {
                "facts": [fact.to_wire() for fact in found],
                "more": more,
                "seq": sequence.seq if sequence is not None else 0,
            },
        )

    def _on_unseen(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        broker = self.broker
        sid, claims = broker._session(message)
        mark = _flag(message, "mark", True)
        if mark and broker._replay(ident, sid, rid):
            return
        repo = claims.repo
        if message.get("scopes") is not None:
            scopes = _scopes(message["scopes"], "scopes")
        else:
            scopes = [row.scope for row in claims.view.claims(sid)]
        limit = _limit(message)
        table = self.tables.get(repo)
        found: list[Fact] = []
        if table is not None and scopes:
            assert self.store is not None
            seen = self.store.seen(sid, repo)
            for fact in table.concerning(scopes):
                if fact.sid != sid and fact.id not in seen:
                    found.append(fact)
                    if len(found) > limit:
                        break
        more = len(found) > limit
        found = found[:limit]
        reply = {
            "facts": [fact.to_wire() for fact in found],
            "more": more,
            "seq": broker.sequences[repo].seq,
        }
        if not mark:
            broker._reply(ident, rid, reply)
            return
        self._mark(sid, repo, [fact.id for fact in found])
        broker._reply(ident, rid, reply, remember=(sid, rid))

    def _on_seen(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        broker = self.broker
        sid, claims = broker._session(message)
        if broker._replay(ident, sid, rid):
            return
        ids = message.get("ids")
        if (
            not isinstance(ids, list)
            or len(ids) > MAX_IDS
            or not all(isinstance(i, str) and len(i) <= MAX_ID_LEN for i in ids)
        ):
            raise BadInput(
                f"'ids' must be a list of at most {MAX_IDS} fact ids", field="ids"
            )
        table = self.tables.get(claims.repo)
        known = [i for i in dict.fromkeys(ids) if table is not None and table.get(i)]
        self._mark(sid, claims.repo, known)
        broker._reply(ident, rid, {"marked": known}, remember=(sid, rid))

    def _mark(self, sid: str, repo: str, ids: list[str]) -> None:
        if not ids:
            return
        assert self.broker.store is not None
        assert self.store is not None
        self.broker.store.begin()
        self.store.mark_seen(sid, repo, ids, self.broker.clock.wall())


# -- checks of request fields -----------------------------------------------------


def _clip(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


def _scopes(raw: Any, key: str, *, required: bool = True) -> list[Scope]:
    if raw is None and not required:
        return []
    if not isinstance(raw, list) or (required and not raw):
        raise BadInput(f"'{key}' must be a non-empty list of scopes", field=key)
    if not all(isinstance(text, str) for text in raw):
        raise BadInput(f"every one of '{key}' must be a string", field=key)
    return [parse_scope(text) for text in raw]


def _string(message: dict[str, Any], key: str, limit: int) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise BadInput(f"'{key}' must be a non-empty string", field=key)
    if len(value) > limit:
        raise BadInput(f"'{key}' is longer than {limit} characters", field=key)
    return value


def _optional_string(message: dict[str, Any], key: str, limit: int) -> str | None:
    return None if message.get(key) is None else _string(message, key, limit)


def _optional_id(message: dict[str, Any], key: str) -> str | None:
    return _optional_string(message, key, MAX_ID_LEN)


def _optional_kind(message: dict[str, Any]) -> str | None:
    kind = message.get("kind")
    return None if kind is None else check_kind(kind)


def _optional_int(message: dict[str, Any], key: str) -> int | None:
    value = message.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadInput(f"'{key}' must be a sequence number >= 0", field=key)
    return value


def _optional_number(message: dict[str, Any], key: str) -> float | None:
    value = message.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"'{key}' must be a wall time in seconds", field=key)
    return float(value)


def _flag(message: dict[str, Any], key: str, default: bool) -> bool:
    value = message.get(key, default)
    if not isinstance(value, bool):
        raise BadInput(f"'{key}' must be true or false", field=key)
    return value


def _limit(message: dict[str, Any]) -> int:
    value = message.get("limit", 100)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput("'limit' must be a whole number", field="limit")
    if not 1 <= value <= MAX_QUERY_LIMIT:
        raise BadInput(f"'limit' must be from 1 to {MAX_QUERY_LIMIT}", field="limit")
    return value
