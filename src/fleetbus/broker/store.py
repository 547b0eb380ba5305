"""Durable state of the broker in SQLite (WAL).

The broker applies a batch of requests in memory, writes what changed here in
one transaction and commits before it answers any of them. The claims part of
the state is written by replaying the claims-stream events of the batch, so the
store cannot disagree with what was published.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fleetbus.claims import Claim, SessionInfo
from fleetbus.errors import FleetbusError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS repos (
    repo TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    heads BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    sid TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS claims_repo ON claims (repo);
CREATE TABLE IF NOT EXISTS requests (
    sid TEXT NOT NULL,
    rid TEXT NOT NULL,
    at REAL NOT NULL,
    reply BLOB NOT NULL,
    PRIMARY KEY (sid, rid)
);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
"""


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
            self.db.executescript(_SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        self._in_tx = False

    def _check_version(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute(
                "INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema {row[0]}, expected {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        """Close the database."""
        self.db.close()

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
        for repo, seq, heads in self.db.execute("SELECT repo, seq, heads FROM repos"):
            repos[repo] = RepoState(seq=seq, heads=orjson.loads(heads))
        for repo, body in self.db.execute("SELECT repo, body FROM sessions"):
            state = repos.setdefault(repo, RepoState())
            state.sessions.append(SessionInfo.from_wire(orjson.loads(body)))
        for repo, body in self.db.execute("SELECT repo, body FROM claims"):
            state = repos.setdefault(repo, RepoState())
            state.claims.append(Claim.from_wire(orjson.loads(body)))
        return repos

    def load_requests(self, since: float) -> dict[tuple[str, str], bytes]:
        """Replies to mutating requests recorded after ``since`` (wall time)."""
        rows = self.db.execute(
            "SELECT sid, rid, reply FROM requests WHERE at >= ?", (since,)
        )
        return {(sid, rid): bytes(reply) for sid, rid, reply in rows}

    def begin(self) -> None:
        """Open the transaction of a batch."""
        if not self._in_tx:
            self.db.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def commit(self) -> None:
        """Commit the batch; nothing is acknowledged before this returns."""
        if self._in_tx:
            self._in_tx = False
            self.db.execute("COMMIT")

    def rollback(self) -> None:
        """Drop the batch's writes."""
        if self._in_tx:
            self._in_tx = False
            self.db.execute("ROLLBACK")

    def save_sequence(self, repo: str, seq: int, heads: dict[str, int]) -> None:
        """Record a repository's sequence and stream heads."""
        self.db.execute(
            "INSERT OR REPLACE INTO repos VALUES (?, ?, ?)",
            (repo, seq, orjson.dumps(heads)),
        )

    def record_request(self, sid: str, rid: str, at: float, reply: bytes) -> None:
        """Remember the reply to a mutating request, for retries."""
        self.db.execute(
            "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?)",
            (sid, rid, at, reply),
        )

    def prune_requests(self, before: float) -> None:
        """Forget replies older than ``before``."""
        self.db.execute("DELETE FROM requests WHERE at < ?", (before,))

    def apply_claim_events(self, repo: str, events: Iterable[dict[str, Any]]) -> None:
        """Write the effect of claims-stream events."""
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
                self.db.executemany(
                    "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)",
                    [
                        (row["id"], repo, row["sid"], orjson.dumps(row))
                        for row in event["claims"]
                    ],
                )
            elif kind == "claim.released":
                self.db.executemany(
                    "DELETE FROM claims WHERE id = ?", [(i,) for i in event["ids"]]
                )
            elif kind == "claim.renewed":
                self._renew(event)

    def _renew(self, event: dict[str, Any]) -> None:
        for claim_id in event["ids"]:
            row = self.db.execute(
                "SELECT body FROM claims WHERE id = ?", (claim_id,)
            ).fetchone()
            if row is None:
                continue
            body = orjson.loads(row[0])
            body["expires"] = event["expires"]
            self.db.execute(
                "UPDATE claims SET body = ? WHERE id = ?",
                (orjson.dumps(body), claim_id),
            )
