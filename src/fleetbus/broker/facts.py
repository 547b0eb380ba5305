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

import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fleetbus import wire
from fleetbus.errors import BadInput
from fleetbus.facts import (
    BROKER_AUTHOR,
    Fact,
    FactLimits,
    FactOutcome,
    FactTable,
    check_body,
    check_kind,
)
from fleetbus.scope import Scope, parse_scope

if TYPE_CHECKING:
    from fleetbus.broker.server import Broker
    from fleetbus.broker.store import Store

MAX_QUERY_LIMIT = 10_000
MAX_SEARCH_LEN = 1024
MAX_IDS = 10_000
MAX_ID_LEN = 64
WARNING_TTL_S = 86_400.0
"""How long the broker's own warning about a lost session stays live."""

_TABLES = (
    """CREATE TABLE IF NOT EXISTS facts (
        n INTEGER PRIMARY KEY,
        repo TEXT NOT NULL,
        id TEXT NOT NULL,
        body BLOB NOT NULL,
        text TEXT NOT NULL,
        UNIQUE (repo, id)
    )""",
    """CREATE TABLE IF NOT EXISTS facts_seen (
        sid TEXT NOT NULL,
        repo TEXT NOT NULL,
        id TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (sid, repo, id)
    )""",
    "CREATE INDEX IF NOT EXISTS facts_seen_fact ON facts_seen (repo, id)",
)
_FTS = "CREATE VIRTUAL TABLE IF NOT EXISTS facts_fts USING fts5(text)"


class FactStore:
    """The facts, their full-text index and the ``seen`` marks, in SQLite.

    Uses the broker store's connection, inside the broker's transaction;
    ``seen`` marks are written as deferred rows of the batch.
    Full-text search uses FTS5 when SQLite has it, else ``LIKE``.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = db = store.db
        for statement in _TABLES:
            db.execute(statement)
        try:
            db.execute(_FTS)
        except sqlite3.OperationalError:
            self.fts = False
        else:
            self.fts = True
        # A store opened by one earlier version indexes new facts by trigger.
        db.execute("DROP TRIGGER IF EXISTS facts_fts_insert")

    def load(self) -> dict[str, list[Fact]]:
        """Every stored fact, by repository, in publication order."""
        self.store.flush()
        out: dict[str, list[Fact]] = {}
        rows = self.db.execute("SELECT repo, body FROM facts ORDER BY n")
        for repo, body in rows:
            out.setdefault(repo, []).append(Fact.from_wire(wire.decode(body)))
        return out

    def save(self, repo: str, facts: Iterable[Fact]) -> None:
        """Write new facts and the new state of changed ones.

        A fact changed last when it was published is new: it is inserted
        without first looking for its row.
        """
        for fact in facts:
            body = wire.encode(fact.to_wire())
            if fact.changed != fact.seq:
                cursor = self.db.execute(
                    "UPDATE facts SET body = ? WHERE repo = ? AND id = ?",
                    (body, repo, fact.id),
                )
                if cursor.rowcount:
                    continue
            cursor = self.db.execute(
                "INSERT INTO facts (repo, id, body, text) VALUES (?, ?, ?, ?)",
                (repo, fact.id, body, fact.body),
            )
            if self.fts:
                self.db.execute(
                    "INSERT INTO facts_fts (rowid, text) VALUES (?, ?)",
                    (cursor.lastrowid, fact.body),
                )

    def delete(self, repo: str, ids: Iterable[str]) -> None:
        """Forget facts, their index entries and who has seen them."""
        self.store.flush()
        for fact_id in ids:
            row = self.db.execute(
                "SELECT n FROM facts WHERE repo = ? AND id = ?", (repo, fact_id)
            ).fetchone()
            if row is None:
                continue
            if self.fts:
                self.db.execute("DELETE FROM facts_fts WHERE rowid = ?", (row[0],))
            self.db.execute("DELETE FROM facts WHERE n = ?", (row[0],))
            self.db.execute(
                "DELETE FROM facts_seen WHERE repo = ? AND id = ?", (repo, fact_id)
            )

    def search(self, repo: str, text: str) -> set[str]:
        """Ids of the facts of ``repo`` whose text has every word of ``text``.

        With FTS5 a word matches whole words it starts (``auth`` finds
        ``authentication``); with ``LIKE`` it matches anywhere in the text.
        """
        words = text.split()
        if not words:
            return set()
        self.store.flush()
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


def _escape_like(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


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
        self._who: dict[str, tuple[str, dict[str, Any]]] = {}
        self._held: dict[str, tuple[str, str]] = {}
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
        """Load the stored facts onto the broker's freshly restored sequences."""
        assert self.broker.store is not None
        self.store = FactStore(self.broker.store)
        self.tables.clear()
        for repo, facts in self.store.load().items():
            self._table(repo).restore(facts)
        self._who.clear()
        self._held.clear()
        for table in self.broker.tables.values():
            for info in table.view.sessions.values():
                self._who[info.sid] = (info.name, dict(info.meta))
            for row in table.view.claims():
                self._held[row.id] = (row.sid, row.scope.text)

    def _table(self, repo: str) -> FactTable:
        table = self.tables.get(repo)
        if table is None:
            self.broker._table(repo)
            table = FactTable(repo, self.broker.sequences[repo], self.limits)
            self.tables[repo] = table
        return table

    def next_due(self) -> float | None:
        """The earliest wall time at which some fact expires or ages out."""
        times = [t for t in (x.next_due() for x in self.tables.values()) if t]
        return min(times, default=None)

    def tick(self, wall: float) -> None:
        """Expire facts whose TTL ran out and drop those past the age bound."""
        for repo, table in self.tables.items():
            due = table.next_due()
            if due is not None and due <= wall:
                self._absorb(repo, table.tick(wall))

    def _absorb(self, repo: str, outcome: FactOutcome) -> None:
        """Persist an outcome in the batch and queue its events."""
        broker = self.broker
        assert broker.store is not None
        assert self.store is not None
        if not (outcome.changed or outcome.dropped or outcome.events):
            return
        broker.store.begin()
        self.store.save(repo, outcome.changed)
        self.store.delete(repo, outcome.dropped)
        broker._dirty.add(repo)
        wall = broker.clock.wall()
        for stamped in outcome.events:
            stamped.event["repo"] = repo
            stamped.event.setdefault("at", wall)
            self._log(stamped.event)
            for prefix, event in stamped.copies():
                broker._events.append((wire.facts_topic(repo, prefix), event))

    def _log(self, event: dict[str, Any]) -> None:
        fields: dict[str, Any] = {"repo": event["repo"], "seq": event["seq"]}
        if event["type"] == "fact.published":
            fact = event["fact"]
            fields.update(id=fact["id"], sid=fact["sid"], kind=fact["kind"])
        else:
            fields.update(ids=event["ids"], reason=event.get("limit", event["reason"]))
        self.broker.log_change(event["type"], **fields)

    # -- the broker's own warnings --------------------------------------------------

    def observe(self, repo: str, events: Iterable[dict[str, Any]]) -> None:
        """Follow claims-stream events; warn about sessions lost holding claims."""
        released: dict[str, list[str]] = {}
        for event in events:
            kind = event["type"]
            if kind == "session.joined":
                session = event["session"]
                self._who[session["sid"]] = (session["name"], session.get("meta") or {})
            elif kind == "claim.granted":
                for row in event["claims"]:
                    self._held[row["id"]] = (row["sid"], row["scope"])
            elif kind == "claim.released":
                for claim_id in event["ids"]:
                    held = self._held.pop(claim_id, None)
                    if held is not None and event.get("reason") == "session_lost":
                        released.setdefault(held[0], []).append(held[1])
            elif kind == "session.lost":
                sid = event["sid"]
                kept = [scope for owner, scope in self._held.values() if owner == sid]
                scopes = released.pop(sid, []) + kept
                if scopes:
                    self._warn_lost(repo, sid, list(dict.fromkeys(scopes)))
                self._who.pop(sid, None)
            elif kind == "session.left":
                self._who.pop(event["sid"], None)

    def _warn_lost(self, repo: str, sid: str, scopes: list[str]) -> None:
        name, meta = self._who.get(sid, (sid, {}))
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
        if broker._replay(ident, sid, rid):
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
        self._absorb(claims.repo, outcome)
        assert outcome.reply is not None
        reply = {"fact": outcome.reply.to_wire(), "seq": outcome.reply.seq}
        broker._reply(ident, rid, reply, remember=(sid, rid))

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
            found = [
                fact
                for fact in table.concerning(scopes)
                if fact.sid != sid and fact.id not in seen
            ]
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
