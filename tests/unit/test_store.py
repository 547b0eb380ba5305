"""The broker store: stream heads one row each, schema 1 migrated, deferred rows."""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from fleetbus.broker import facts as broker_facts
from fleetbus.broker.facts import FactStore, StoredFacts, StoredHeads
from fleetbus.broker.store import SCHEMA_VERSION, RepoState, Store
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


def _saved_and_loaded(path: Path, batches: list[tuple[str, ...]]) -> RepoState:
    """Stamp the streams of each batch and commit it; then load the store anew."""
    store = Store(path)
    sequence = Sequence()
    for batch in batches:
        for stream in batch:
            sequence.stamp(stream, {})
        store.begin()
        store.save_sequence("git:r", sequence.seq, sequence.take_changed())
        store.commit()
    store.close()
    again = Store(path)
    try:
        return again.load()["git:r"]
    finally:
        again.close()


def test_heads_saved_piecemeal_are_all_loaded(tmp_path: Path) -> None:
    batches = [("claims",), ("facts/a",), ("facts/b",), ("facts/a",)]

    state = _saved_and_loaded(tmp_path / "db.sqlite", batches)

    assert state.seq == 4
    assert state.heads == {"claims": 1, "facts/a": 4, "facts/b": 3}


def test_load_leaves_fact_stream_heads_in_the_store(tmp_path: Path) -> None:
    """Heads before and after the ``facts:`` streams load; those streams do not."""
    streams = ("claims", "facts:src/a.py", "facts:src/b.py", "~z", "a")

    state = _saved_and_loaded(tmp_path / "db.sqlite", [streams])

    assert state.heads == {"a": 5, "claims": 1, "~z": 4}


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


def _stored(store: Store, repo: str = "git:r") -> tuple[FactStore, FactTable]:
    facts = FactStore(store)
    table = FactTable(
        repo,
        Sequence(),
        FactLimits(),
        rows=StoredFacts(facts, repo),
        heads=StoredHeads(facts, repo),
    )
    return facts, table


def _publish(table: FactTable, text: str, topic: str = "src/", **options: Any) -> Fact:
    out = table.publish("s1", "S1", [parse_scope(topic)], text, now=100.0, **options)
    assert out.reply is not None
    return out.reply


def test_facts_written_in_a_batch_are_found_before_its_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    facts, table = _stored(store)
    first = _publish(table, "tokens are cached")
    facts.mark_seen("s2", "git:r", [first.id], 100.0)

    got = table.get(first.id)
    found = facts.search("git:r", "tokens")
    queried = table.query([parse_scope("src/a.py")])[0]
    seen = facts.seen("s2", "git:r")
    store.commit()

    assert got == first
    assert found == {first.id}
    assert queried == [first]
    assert seen == {first.id}


def test_an_ended_fact_is_updated_and_indexed_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    facts, table = _stored(store)
    fact = _publish(table, "tokens are cached")
    table.retract("s1", fact.id, 101.0)
    store.commit()

    _, reopened = _stored(store)
    loaded = reopened.get(fact.id)
    fts = "facts_fts_docsize" if facts.fts else "facts WHERE 0"
    indexed = store.db.execute(f"SELECT count(*) FROM {fts}").fetchone()

    assert loaded is not None
    assert loaded.state == "retracted"
    assert reopened.query(include_history=True)[0] == [loaded]
    assert reopened.query()[0] == []
    assert indexed == (1 if facts.fts else 0,)


def test_rollback_drops_the_batch_and_its_deferred_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    facts, table = _stored(store)
    store.begin()
    _publish(table, "never committed")
    store.record_request("s1", "r1", 100.0, b"{}")
    facts.put_reply("s1", "r2", 100.0, "git:r", 1)

    store.rollback()
    store.begin()
    store.commit()

    assert not facts.holds("git:r")
    assert store.load_requests(0.0) == {}
    assert facts.reply("s1", "r2", 0.0) is None


def test_retention_drops_the_oldest_with_their_index_rows(tmp_path: Path) -> None:
    """Dropped facts leave the store, their topics, search and seen records,
    also when published and dropped in one batch."""
    store = Store(tmp_path / "db.sqlite")
    facts = FactStore(store)
    table = FactTable(
        "git:r",
        Sequence(),
        FactLimits(max_facts=2),
        rows=StoredFacts(facts, "git:r"),
        heads=StoredHeads(facts, "git:r"),
    )
    old = _publish(table, "alpha one")
    facts.mark_seen("s2", "git:r", [old.id], 100.0)
    store.commit()
    kept = [_publish(table, f"beta {n}", topic=f"src/{n}.py") for n in range(3)][1:]
    store.commit()

    _, reopened = _stored(store)
    counts = [
        store.db.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        for name in ("facts", "fact_topics", "facts_seen")
    ]

    assert len(reopened) == 2
    assert reopened.query(include_history=True)[0] == kept
    assert facts.search("git:r", "alpha beta") == set()
    assert counts == [2, 2, 0]


def test_stream_heads_moved_out_of_memory_are_read_back(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Heads past the memory bound are read from the store, written or not."""
    monkeypatch.setattr(broker_facts, "HEADS_CACHED", 2)
    store = Store(tmp_path / "db.sqlite")
    _, table = _stored(store)
    first = table.publish("s1", "S1", [parse_scope("a/x")], "x", now=1.0)
    for name in ("b/x", "c/x", "d/x"):
        table.publish("s1", "S1", [parse_scope(name)], "x", now=1.0)
    again = table.publish("s1", "S1", [parse_scope("a/x")], "x", now=1.0)
    store.commit()
    _, reopened = _stored(store)
    reopened.sequence.seq = table.sequence.seq
    third = reopened.publish("s1", "S1", [parse_scope("a/x")], "x", now=1.0)

    assert first.events[0].links == [(("a", "x"), 0)]
    assert again.events[0].links == [(("a", "x"), first.events[0].event["seq"])]
    assert third.events[0].links == [(("a", "x"), again.events[0].event["seq"])]


def test_facts_stream_heads_are_not_loaded_with_the_repository(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "db.sqlite")
    store.begin()
    store.save_sequence("git:r", 9, {"claims": 3, "facts:src": 9, "other": 2})
    store.commit()

    assert store.load()["git:r"].heads == {"claims": 3, "other": 2}


def test_schema_2_store_of_the_release_is_migrated(tmp_path: Path) -> None:
    """A store written by the release before facts got their columns opens,
    keeps every fact, its state, search, seen marks and stream heads."""
    path = tmp_path / "db.sqlite"
    shutil.copy(Path(__file__).parent.parent / "data" / "store-schema2.sqlite", path)
    before = sqlite3.connect(path)
    bodies = dict(before.execute("SELECT id, body FROM facts"))
    before.close()

    store = Store(path)
    facts = FactStore(store)
    state = store.load()["git:r"]
    table = FactTable(
        "git:r",
        Sequence(state.seq, state.heads),
        FactLimits(),
        rows=StoredFacts(facts, "git:r"),
        heads=StoredHeads(facts, "git:r"),
    )
    schema = store.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    history = table.query(include_history=True)[0]
    live = table.query([parse_scope("src/auth/login.py")])[0]
    out = table.publish("s9", "S9", [parse_scope("src/auth/login.py")], "x", now=2e3)

    assert schema == (str(SCHEMA_VERSION),)
    assert {f.id: f.to_wire() for f in history} == {
        i: orjson.loads(body) for i, body in bodies.items()
    }
    assert [f.id for f in live] == ["f2", "f6"]
    assert [f.state for f in history if f.id == "f4"] == ["retracted"]
    assert facts.search("git:r", "memcached") == {"f6"}
    store.db.execute("INSERT INTO facts_fts (facts_fts) VALUES ('integrity-check')")
    assert facts.seen("s2", "git:r") == {"f2"}
    assert table.next_due() == 1002.0 + 3600.0
    assert out.events[0].links == [(("src", "auth", "login.py"), 7)]


def test_the_search_index_reads_the_facts_text_and_stays_whole(
    tmp_path: Path,
) -> None:
    """The full-text index keeps no copy of the text, an index that did is
    rebuilt on open, and dropped facts leave it consistent."""
    store = Store(tmp_path / "db.sqlite")
    facts, table = _stored(store)
    if not facts.fts:
        pytest.skip("SQLite without FTS5")
    _publish(table, "alpha one")
    store.commit()
    db = store.db
    db.execute("DROP TABLE facts_fts")
    db.execute("CREATE VIRTUAL TABLE facts_fts USING fts5(text)")
    db.execute("INSERT INTO facts_fts (rowid, text) SELECT n, text FROM facts")

    facts = FactStore(store)
    table = FactTable(
        "git:r",
        Sequence(1),
        FactLimits(max_facts=2),
        rows=StoredFacts(facts, "git:r"),
        heads=StoredHeads(facts, "git:r"),
    )
    betas = [_publish(table, f"beta {n}", topic=f"src/{n}.py") for n in range(3)]
    store.commit()
    db.execute("INSERT INTO facts_fts (facts_fts) VALUES ('integrity-check')")
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}

    assert "facts_fts_content" not in tables
    assert facts.search("git:r", "alpha") == set()
    assert facts.search("git:r", "beta") == {fact.id for fact in betas[1:]}


_TOPICS = ["src/", "src/a.py", "src/*.py", "src/b/", "docs/x.md", "@build", "*.md"]
_QUERIES = [*_TOPICS, "src/a/b.py", "**", "src/**/*.py", "@other", "docs/"]


@pytest.mark.parametrize("seed", range(6))
def test_stored_facts_answer_queries_like_facts_in_memory(
    tmp_path: Path, seed: int
) -> None:
    """The same changes on a stored table and an in-memory one: every query
    answers the same."""
    rng = random.Random(seed)
    store = Store(tmp_path / "db.sqlite")
    _, stored = _stored(store)
    memory = FactTable("git:r", Sequence(), FactLimits(max_facts=40))
    stored.limits = memory.limits
    for step in range(60):
        topics = [parse_scope(t) for t in rng.sample(_TOPICS, rng.randint(1, 2))]
        live = [f for f in memory.query(limit=1000)[0] if f.sid == "s1"]
        choice = rng.random()
        sid, kind = rng.choice(["s1", "s2"]), rng.choice(["note", "gotcha"])
        for each in (memory, stored):
            if choice < 0.15 and live:
                each.retract("s1", live[0].id, float(step))
            elif choice < 0.25 and live:
                old = live[-1].id
                each.publish("s2", "S2", [], f"new {step}", supersedes=old, now=step)
            else:
                each.publish(sid, "N", topics, f"fact {step}", kind=kind, now=step)
        if step % 7 == 0:
            store.commit()
    mark = memory.sequence.seq // 2
    for text in _QUERIES:
        scope = [parse_scope(text)]
        for options in (
            {},
            {"include_history": True},
            {"changed_since": mark, "limit": 5},
            {"since": mark, "limit": 3},
            {"kind": "gotcha", "author": "s1", "limit": 2},
        ):
            assert stored.query(scope, **options) == memory.query(scope, **options)
        assert list(stored.concerning(scope)) == list(memory.concerning(scope))
    assert stored.query(limit=7) == memory.query(limit=7)
    assert len(stored) == len(memory)


def test_a_publish_reply_outlives_its_fact_within_the_retry_window(
    tmp_path: Path,
) -> None:
    """A retried publish gets its first reply, rebuilt from its fact, or kept
    when retention drops the fact before the retry window ends."""
    store = Store(tmp_path / "db.sqlite")
    facts = FactStore(store)
    facts.wall = lambda: 100.0
    table = FactTable(
        "git:r",
        Sequence(),
        FactLimits(max_facts=1),
        rows=StoredFacts(facts, "git:r"),
        heads=StoredHeads(facts, "git:r"),
    )
    replies = []
    for rid in ("r1", "r2"):
        facts.rid = rid
        out = table.publish("s1", "S1", [parse_scope("src/")], rid, now=100.0)
        assert out.reply is not None
        fact = out.events[0].event["fact"]
        replies.append(broker_facts.publish_reply(rid, fact, out.reply.seq))
        facts.put_reply("s1", rid, 100.0, "git:r", out.reply.seq)
        store.commit()
    facts.rid = None
    table.retract("s1", "f2", 101.0)
    store.commit()

    assert [facts.reply("s1", rid, 0.0) for rid in ("r1", "r2")] == replies
    assert facts.reply("s1", "r1", 200.0) is None
    assert table.get("f1") is None


def test_a_publish_reply_is_found_by_a_reopened_store(tmp_path: Path) -> None:
    """A retry after a restart still gets its first reply: the stored replies
    are looked up in the store, not in the filter."""
    store = Store(tmp_path / "db.sqlite")
    facts, table = _stored(store)
    facts.rid = "r1"
    fact = _publish(table, "kept")
    facts.put_reply("s1", "r1", 100.0, "git:r", fact.seq)
    store.commit()
    first = facts.reply("s1", "r1", 0.0)

    reopened = FactStore(store)

    assert first is not None
    assert reopened.reply("s1", "r1", 0.0) == first
    assert reopened.reply("s1", "r2", 0.0) is None


def test_a_reopened_store_reads_no_reply_into_the_filter(tmp_path: Path) -> None:
    """Opening the store costs nothing per stored reply: lookups reaching back
    to them go to the store, later ones are answered by the filter."""
    store = Store(tmp_path / "db.sqlite")
    facts, table = _stored(store)
    for n in range(1, 4):
        facts.rid = f"r{n}"
        fact = _publish(table, f"fact {n}")
        facts.put_reply("s1", f"r{n}", 100.0 + n, "git:r", fact.seq)
    store.commit()
    first = [facts.reply("s1", f"r{n}", 0.0) for n in range(1, 4)]

    reopened = FactStore(store)

    assert None not in first
    assert [reopened.reply("s1", f"r{n}", 0.0) for n in range(1, 4)] == first
    assert reopened.reply("s1", "r1", 101.5) is None
    assert reopened.recent.may_hold("s1", "r1", 103.0)
    assert not reopened.recent.may_hold("s1", "r9", 103.5)


def test_recent_publishes_never_miss_one_they_saw() -> None:
    """Every publish noted is found again across windows, most unseen ones are
    not, and a lookup reaching into a dropped window is not refused."""
    recent = broker_facts.RecentPublishes()
    seen = [(f"s{n % 7}", f"r{n}", float(n)) for n in range(30_000)]
    for sid, rid, at in seen:
        recent.add(sid, rid, at, 10_000.0)

    assert all(recent.may_hold(sid, rid, at) for sid, rid, at in seen[20_001:])
    assert all(recent.may_hold(sid, rid, 0.0) for sid, rid, _at in seen)
    unseen = [recent.may_hold("s1", f"x{n}", 20_001.0) for n in range(10_000)]
    assert sum(unseen) < 100
    assert not recent.may_hold("s1", "r29999", 30_000.0)


def test_retention_by_count_after_reopening_counts_what_is_stored(
    tmp_path: Path,
) -> None:
    """A reopened table knows only a bound on its count until retention needs
    the count: then it drops exactly the excess."""
    store = Store(tmp_path / "db.sqlite")
    _, table = _stored(store)
    for n in range(5):
        _publish(table, f"fact {n}", topic=f"src/{n}.py")
    store.commit()
    facts = FactStore(store)
    reopened = FactTable(
        "git:r",
        Sequence(table.sequence.seq + 10),
        FactLimits(max_facts=3),
        rows=StoredFacts(facts, "git:r"),
        heads=StoredHeads(facts, "git:r"),
    )

    out = reopened.publish("s1", "S1", [parse_scope("src/x.py")], "new", now=1.0)
    store.commit()

    assert out.dropped == ["f1", "f2", "f3"]
    assert len(reopened) == 3
    assert [f.body for f in reopened.query()[0]] == ["fact 3", "fact 4", "new"]
