"""Durable state of the broker in SQLite (WAL).

The broker applies a batch of requests in memory, writes what changed here in
one transaction and commits before it answers any of them. The claims part of
the state is written by replaying the claims-stream events of the batch, so the
store cannot disagree with what was published.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fleetbus.claims import Claim, SessionInfo
from fleetbus.errors import FleetbusError
from fleetbus.scope import literal_scope, parse_scope

SCHEMA_VERSION = 3

CACHE_KIB = 64 * 1024
"""SQLite's page cache: facts are read from the store, not held in memory."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS repos (
    repo TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS heads (
    repo TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (repo, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    sid TEXT NOT NULL,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    mode TEXT NOT NULL,
    intent TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    fence INTEGER NOT NULL,
    since REAL NOT NULL,
    expires REAL,
    body TEXT GENERATED ALWAYS AS (json_object(
        'id', id, 'sid', sid, 'name', name, 'scope', scope, 'mode', mode,
        'intent', intent, 'grant', grant_id, 'fence', fence, 'since', since,
        'expires', expires
    )) VIRTUAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    sid TEXT NOT NULL,
    rid TEXT NOT NULL,
    at REAL NOT NULL,
    reply BLOB NOT NULL,
    PRIMARY KEY (sid, rid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
"""

# Schema 2 kept claims (as JSON) and remembered replies in rowid tables with
# one more index each: every commit wrote a page of each tree. Rebuilt in place.
_SLIM_TABLES = """
CREATE TABLE claims_3 (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    sid TEXT NOT NULL,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    mode TEXT NOT NULL,
    intent TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    fence INTEGER NOT NULL,
    since REAL NOT NULL,
    expires REAL,
    body TEXT GENERATED ALWAYS AS (json_object(
        'id', id, 'sid', sid, 'name', name, 'scope', scope, 'mode', mode,
        'intent', intent, 'grant', grant_id, 'fence', fence, 'since', since,
        'expires', expires
    )) VIRTUAL
) WITHOUT ROWID;
INSERT INTO claims_3 (
    id, repo, sid, name, scope, mode, intent, grant_id, fence, since, expires
) SELECT
    id, repo, sid, json_extract(body, '$.name'), json_extract(body, '$.scope'),
    json_extract(body, '$.mode'), json_extract(body, '$.intent'),
    json_extract(body, '$.grant'), json_extract(body, '$.fence'),
    json_extract(body, '$.since'), json_extract(body, '$.expires')
FROM claims;
DROP TABLE claims;
ALTER TABLE claims_3 RENAME TO claims;
CREATE TABLE requests_3 (
    sid TEXT NOT NULL,
    rid TEXT NOT NULL,
    at REAL NOT NULL,
    reply BLOB NOT NULL,
    PRIMARY KEY (sid, rid)
) WITHOUT ROWID;
INSERT INTO requests_3 SELECT sid, rid, at, reply FROM requests;
DROP TABLE requests;
ALTER TABLE requests_3 RENAME TO requests;
CREATE INDEX requests_at ON requests (at);
"""

FACT_REPLIES = """CREATE TABLE IF NOT EXISTS fact_replies (
    sid TEXT NOT NULL,
    rid TEXT NOT NULL,
    at REAL NOT NULL,
    repo TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reply BLOB,
    PRIMARY KEY (sid, rid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fact_replies_at ON fact_replies (at);
"""
"""Which fact each recent publish published, for retries (see the fact store)."""

FACTS_STREAMS = "facts:"
"""The stream keys of facts topics start with this; their heads are read
by the fact tables when needed, not loaded with the repository."""


# A claim row's columns after its id, in the order of Claim's fields.
_CLAIM_COLUMNS = "repo, sid, name, scope, mode, intent, grant_id, fence, since, expires"


class _Checkpointer:
    """A thread with its own connection that checkpoints the log passively."""

    def __init__(self, path: Path, interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(path, interval_s),
            name="fleetbus-checkpoint",
            daemon=True,
        )
        self._thread.start()

    def _run(self, path: Path, interval_s: float) -> None:
        try:
            db = sqlite3.connect(str(path), isolation_level=None)
        except sqlite3.Error:
            return
        try:
            while not self._stop.wait(interval_s):
                # A failed copy is retried on the next tick or by the loop.
                with contextlib.suppress(sqlite3.Error):
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class StoreError(FleetbusError):
    """The store could not be opened, read or written."""

    code = "store"
    exit_code = 4


@dataclass(slots=True)
class RepoState:
    """What the store holds for one repository."""

    seq: int = 0
    heads: dict[str, int] = field(default_factory=dict)
    sessions: list[SessionInfo] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


class Store:
    """The broker's SQLite database."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False
            )
            os.chmod(path, 0o600)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={synchronous}")
            self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            # No checkpoint inside a commit that replies wait on: the log is
            # copied back by a thread of its own and between turns (see
            # checkpoint_in_background and checkpoint).
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.db.executescript(_SCHEMA)
            self.db.executescript(FACT_REPLIES)
            self._check_version()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        self._in_tx = False
        self.commits = 0
        """Commits since the last checkpoint."""
        self._checkpointer: _Checkpointer | None = None
        self._deferred: dict[str, list[tuple[Any, ...]]] = {}
        self._puts: dict[str, dict[Any, tuple[Any, ...]]] = {}
        # Claim rows changed this batch, by id: the row's columns after the id
        # (see _CLAIM_COLUMNS), None if gone.
        self._claims: dict[str, tuple[Any, ...] | None] = {}
        self.flushes = 0
        """How many times deferred rows were written or dropped."""

    def _check_version(self) -> None:
        """Record the schema of a new store; migrate an older one.

        Schema 1 kept stream heads as one JSON map per repository; schema 2
        kept each fact as one JSON document, which the fact store gives its
        columns when it opens.
        """
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute(
                "INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
            return
        version = int(row[0])
        if version not in (1, 2, SCHEMA_VERSION):
            raise StoreError(
                f"store {self.path} has schema {row[0]}, expected {SCHEMA_VERSION}"
            )
        if version == 1:
            self._migrate_heads()
        if version in (1, 2):
            self._slim_tables()
        self.db.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),)
        )

    def _migrate_heads(self) -> None:
        """Schema 1 kept each repository's stream heads as one JSON map."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for repo, heads in self.db.execute(
                "SELECT repo, heads FROM repos"
            ).fetchall():
                self.db.executemany(
                    "INSERT OR REPLACE INTO heads VALUES (?, ?, ?)",
                    [
                        (repo, stream, seq)
                        for stream, seq in orjson.loads(heads).items()
                    ],
                )
            self.db.execute("ALTER TABLE repos DROP COLUMN heads")
            self.db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _slim_tables(self) -> None:
        """Schema 2's claims and requests tables, rebuilt without rowids."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SLIM_TABLES.split(";"):
                if statement.strip():
                    self.db.execute(statement)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        """Close the database (and stop the checkpoint thread, if any)."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.db.close()

    def checkpoint_in_background(self, interval_s: float) -> None:
        """Copy the log back every ``interval_s`` on a thread of its own.

        SQLite works without the interpreter lock, so the copy and its
        ``fsync`` run beside the loop. Under a steady stream of commits such a
        checkpoint never catches up with the writer, so the loop still calls
        :meth:`checkpoint` now and then, which then has little left to copy.
        """
        if self._checkpointer is None:
            self._checkpointer = _Checkpointer(self.path, interval_s)

    def bump_epoch(self) -> int:
        """Start a new broker epoch and return it (committed)."""
        row = self.db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        epoch = (int(row[0]) if row else 0) + 1
        self.db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch),)
        )
        return epoch

    def load(self) -> dict[str, RepoState]:
        """Every repository's sequence, sessions and claims."""
        repos: dict[str, RepoState] = {}
        for repo, seq in self.db.execute("SELECT repo, seq FROM repos"):
            repos[repo] = RepoState(seq=seq)
        # Two ranges of the key per repository, before and after the facts
        # streams, each its own search: SQLite answers an OR of the two by
        # scanning every head of the repository, a million with as many topics.
        end = FACTS_STREAMS[:-1] + chr(ord(FACTS_STREAMS[-1]) + 1)
        for repo, state in repos.items():
            for where, bound in (("stream < ?", FACTS_STREAMS), ("stream >= ?", end)):
                rows = self.db.execute(
                    f"SELECT stream, seq FROM heads WHERE repo = ? AND {where}",
                    (repo, bound),
                )
                state.heads.update(rows)
        for repo, body in self.db.execute("SELECT repo, body FROM sessions"):
            state = repos.setdefault(repo, RepoState())
            state.sessions.append(SessionInfo.from_wire(orjson.loads(body)))
        rows = self.db.execute(f"SELECT id, {_CLAIM_COLUMNS} FROM claims")
        for cid, repo, sid, name, text, mode, intent, grant, fence, since, ends in rows:
            held = repos.get(repo)
            if held is None:
                held = repos[repo] = RepoState()
            scope = literal_scope(text) or parse_scope(text)
            held.claims.append(
                Claim(cid, sid, name, scope, mode, intent, grant, fence, since, ends)
            )
        return repos

    def load_requests(self, since: float) -> dict[tuple[str, str], bytes]:
        """Replies to mutating requests recorded after ``since`` (wall time)."""
        self.flush()
        rows = self.db.execute(
            "SELECT sid, rid, reply FROM requests WHERE at >= ?", (since,)
        )
        return {(sid, rid): bytes(reply) for sid, rid, reply in rows}

    def begin(self) -> None:
        """Open the transaction of a batch."""
        if not self._in_tx:
            self.db.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def defer(self, sql: str, row: tuple[Any, ...]) -> None:
        """Write ``row`` with ``sql`` in this batch, at the latest on commit.

        Rows of one statement are written together with ``executemany``,
        which costs far less per row than one ``execute`` each. Statements go
        in the order first deferred, so deferred writes must not depend on one
        another; :meth:`flush` before reading or changing what they write.
        """
        self.begin()
        self._deferred.setdefault(sql, []).append(row)

    def put(self, sql: str, key: Any, row: tuple[Any, ...]) -> None:
        """Like :meth:`defer`, but of the rows put under one ``key`` only the
        last is written: for a value that may change several times a batch.

        Put rows are written after the deferred ones.
        """
        self.begin()
        self._puts.setdefault(sql, {})[key] = row

    def pending(self, sql: str, key: Any) -> tuple[Any, ...] | None:
        """The row put under ``key`` for ``sql`` and not yet written, if any."""
        rows = self._puts.get(sql)
        return None if rows is None else rows.get(key)

    @property
    def deferred(self) -> bool:
        """Whether rows are waiting to be written."""
        return bool(self._deferred or self._puts or self._claims)

    def flush(self) -> None:
        """Write the deferred rows now, inside the batch's transaction."""
        if not (self._deferred or self._puts or self._claims):
            return
        deferred, self._deferred = self._deferred, {}
        puts, self._puts = self._puts, {}
        self.flushes += 1
        for sql, rows in deferred.items():
            self.db.executemany(sql, rows)
        for sql, keyed in puts.items():
            self.db.executemany(sql, keyed.values())
        self._flush_claims()

    def _flush_claims(self) -> None:
        claims, self._claims = self._claims, {}
        kept = [(cid, *row) for cid, row in claims.items() if row is not None]
        gone = [(cid,) for cid, row in claims.items() if row is None]
        if kept:
            self.db.executemany(
                f"INSERT OR REPLACE INTO claims (id, {_CLAIM_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                kept,
            )
        if gone:
            self.db.executemany("DELETE FROM claims WHERE id = ?", gone)

    def commit(self) -> None:
        """Commit the batch; nothing is acknowledged before this returns."""
        if self._in_tx:
            self.flush()
            self._in_tx = False
            self.db.execute("COMMIT")
            self.commits += 1

    def checkpoint(self) -> int:
        """Copy the write-ahead log back into the database; frames left in it.

        Passive: it never waits for a lock. Called between turns, after the
        replies of the last batch are out.
        """
        row = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.commits = 0
        return int(row[1]) - int(row[2]) if row and row[1] >= 0 else 0

    def rollback(self) -> None:
        """Drop the batch's writes."""
        self._deferred.clear()
        self._puts.clear()
        self._claims.clear()
        self.flushes += 1
        if self._in_tx:
            self._in_tx = False
            self.db.execute("ROLLBACK")

    def save_sequence(self, repo: str, seq: int, changed: dict[str, int]) -> None:
        """Record a repository's sequence and the stream heads that moved."""
        self.db.execute("INSERT OR REPLACE INTO repos VALUES (?, ?)", (repo, seq))
        self.db.executemany(
            "INSERT OR REPLACE INTO heads VALUES (?, ?, ?)",
            [(repo, stream, head) for stream, head in changed.items()],
        )

    def record_request(self, sid: str, rid: str, at: float, reply: bytes) -> None:
        """Remember the reply to a mutating request, for retries."""
        self.defer(
            "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?)", (sid, rid, at, reply)
        )

    def prune_requests(self, before: float) -> None:
        """Forget replies older than ``before``."""
        self.flush()
        self.db.execute("DELETE FROM requests WHERE at < ?", (before,))
        self.db.execute("DELETE FROM fact_replies WHERE at < ?", (before,))

    def apply_claim_events(self, repo: str, events: Iterable[dict[str, Any]]) -> None:
        """Write the effect of claims-stream events.

        Claim rows are written with the batch's other deferred rows, the last
        change of each row winning; sessions at once.
        """
        self.begin()
        claims = self._claims
        for event in events:
            kind = event["type"]
            if kind == "session.joined":
                session = event["session"]
                self.db.execute(
                    "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)",
                    (session["sid"], repo, orjson.dumps(session)),
                )
            elif kind in ("session.left", "session.lost"):
                self.db.execute("DELETE FROM sessions WHERE sid = ?", (event["sid"],))
            elif kind == "claim.granted":
                for row in event["claims"]:
                    claims[row["id"]] = (
                        repo,
                        row["sid"],
                        row["name"],
                        row["scope"],
                        row["mode"],
                        row["intent"],
                        row["grant"],
                        row["fence"],
                        row["since"],
                        row["expires"],
                    )
            elif kind == "claim.released":
                for claim_id in event["ids"]:
                    claims[claim_id] = None
            elif kind == "claim.renewed":
                self._renew(event)

    def _renew(self, event: dict[str, Any]) -> None:
        expires = event["expires"]
        for claim_id in event["ids"]:
            if claim_id in self._claims:
                pending = self._claims[claim_id]
            else:
                pending = self.db.execute(
                    f"SELECT {_CLAIM_COLUMNS} FROM claims WHERE id = ?", (claim_id,)
                ).fetchone()
            if pending is not None:
                self._claims[claim_id] = (*pending[:-1], expires)
