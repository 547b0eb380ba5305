"""Claim rows in the store: written once per batch, last change winning."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from fleetbus.broker.store import SCHEMA_VERSION, Store

SCHEMA_2 = Path(__file__).parent.parent / "data" / "store-schema2.sqlite"


def _row(cid: str, sid: str = "s1", expires: float | None = None) -> dict[str, Any]:
    return {
        "id": cid,
        "sid": sid,
        "name": sid,
        "scope": f"src/{cid}.py",
        "mode": "exclusive",
        "intent": "",
        "grant": f"g-{cid}",
        "fence": 1,
        "since": 1.0,
        "expires": expires,
    }


def _stored(store: Store) -> dict[str, dict[str, Any]]:
    return {
        cid: orjson.loads(body)
        for cid, body in store.db.execute("SELECT id, body FROM claims")
    }


def test_a_batch_keeps_the_last_change_of_each_claim(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    try:
        store.apply_claim_events(
            "r", [{"type": "claim.granted", "claims": [_row("a")]}]
        )
        store.commit()
        events = [
            {"type": "claim.released", "ids": ["a"]},
            {"type": "claim.granted", "claims": [_row("b"), _row("c")]},
            {"type": "claim.released", "ids": ["b"]},
            {"type": "claim.renewed", "ids": ["c", "b", "zz"], "expires": 9.0},
        ]
        store.apply_claim_events("r", events[:2])
        store.apply_claim_events("r", events[2:])
        assert store.deferred
        store.commit()
        assert _stored(store) == {"c": _row("c", expires=9.0)}

        store.apply_claim_events(
            "r", [{"type": "claim.renewed", "ids": ["c"], "expires": 12.0}]
        )
        store.rollback()
        assert _stored(store) == {"c": _row("c", expires=9.0)}
    finally:
        store.close()
    reopened = Store(tmp_path / "s.db")
    try:
        state = reopened.load()["r"]
        assert [claim.id for claim in state.claims] == ["c"]
        assert state.claims[0].expires == 9.0
    finally:
        reopened.close()


def test_schema_2_claims_and_replies_are_rebuilt_without_rowids(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite"
    shutil.copy(SCHEMA_2, path)
    old = sqlite3.connect(path)
    old.executemany(
        "INSERT INTO claims VALUES (?, ?, ?, ?)",
        [(f"c{n}", "r", "s1", orjson.dumps(_row(f"c{n}"))) for n in range(50)],
    )
    old.execute("INSERT INTO requests VALUES ('s1', 'q1', 5.0, x'7b7d')")
    old.commit()
    old.close()

    store = Store(path)
    try:
        tables = dict(
            store.db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
        )
        indexes = {
            name
            for (name,) in store.db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index'"
            )
        }
        assert "WITHOUT ROWID" in tables["claims"]
        assert "WITHOUT ROWID" in tables["requests"]
        assert "claims_repo" not in indexes
        assert "requests_at" in indexes
        assert {c.id for c in store.load()["r"].claims} == {f"c{n}" for n in range(50)}
        assert store.load_requests(0.0) == {("s1", "q1"): b"{}"}
        schema = store.db.execute("SELECT value FROM meta WHERE key = 'schema'")
        assert schema.fetchone()[0] == str(SCHEMA_VERSION)
    finally:
        store.close()
