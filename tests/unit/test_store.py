"""The broker store: stream heads one row each, schema 1 migrated, deferred rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson

from fleetbus.broker.facts import FactStore
from fleetbus.broker.store import SCHEMA_VERSION, Store
from fleetbus.facts import Fact, FactLimits, FactTable
from fleetbus.scope import parse_scope
from fleetbus.sequence import Sequence


def test_take_changed_returns_only_heads_moved_since_last_call() -> None:
    sequence = Sequence()
    sequence.stamp("claims", {})
    sequence.link("facts/a", sequence.next_number())
    assert sequence.take_changed() == {"claims": 1, "facts/a": 2}
    sequence.stamp("facts/b", {})
    assert sequence.take_changed() == {"facts/b": 3}
    assert sequence.take_changed() == {}


def test_heads_saved_piecemeal_are_all_loaded(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    sequence = Sequence()
    for stream in ("claims", "facts/a", "facts/b", "facts/a"):
        sequence.stamp(stream, {})
        store.begin()
        store.save_sequence("git:r", sequence.seq, sequence.take_changed())
        store.commit()
    store.close()

    state = Store(tmp_path / "db.sqlite").load()["git:r"]

    assert state.seq == 4
    assert state.heads == {"claims": 1, "facts/a": 4, "facts/b": 3}


def test_schema_1_store_keeps_its_heads_after_migration(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE repos (repo TEXT PRIMARY KEY, seq INTEGER NOT NULL,
                            heads BLOB NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        """
    )
    heads = orjson.dumps({"claims": 5, "facts/x": 7})
    db.execute("INSERT INTO repos VALUES ('git:r', 7, ?)", (heads,))
    db.commit()
    db.close()

    store = Store(path)
    state = store.load()["git:r"]
    store.begin()
    store.save_sequence("git:r", 8, {"facts/y": 8})
    store.commit()

    assert (state.seq, state.heads) == (7, {"claims": 5, "facts/x": 7})
    assert store.load()["git:r"].heads == {"claims": 5, "facts/x": 7, "facts/y": 8}
    schema = store.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    assert schema == (str(SCHEMA_VERSION),)


def _fact_table() -> FactTable:
    return FactTable("git:r", Sequence(), FactLimits())


def _publish(table: FactTable, text: str) -> Fact:
    out = table.publish("s1", "S1", [parse_scope("src/")], text, now=100.0)
    assert out.reply is not None
    return out.reply


def test_facts_written_in_a_batch_are_found_before_its_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    facts = FactStore(store)
    table = _fact_table()
    first = _publish(table, "tokens are cached")
    facts.save("git:r", [first])
    facts.mark_seen("s2", "git:r", [first.id], 100.0)

    found = facts.search("git:r", "tokens")
    seen = facts.seen("s2", "git:r")
    store.commit()

    assert found == {first.id}
    assert seen == {first.id}


def test_a_fact_saved_again_is_updated_and_indexed_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    facts = FactStore(store)
    table = _fact_table()
    fact = _publish(table, "tokens are cached")
    facts.save("git:r", [fact])
    retracted = table.retract("s1", fact.id, 101.0).changed
    facts.save("git:r", retracted)
    store.commit()

    (loaded,) = facts.load()["git:r"]
    fts = "facts_fts" if facts.fts else "facts WHERE 0"
    indexed = store.db.execute(f"SELECT count(*) FROM {fts}").fetchone()

    assert loaded.state == "retracted"
    assert indexed == (1 if facts.fts else 0,)


def test_rollback_drops_the_batch_and_its_deferred_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    facts = FactStore(store)
    store.begin()
    facts.save("git:r", [_publish(_fact_table(), "never committed")])
    store.record_request("s1", "r1", 100.0, b"{}")

    store.rollback()
    store.begin()
    store.commit()

    assert facts.load() == {}
    assert store.load_requests(0.0) == {}
