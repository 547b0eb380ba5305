"""Tests of learned facts without I/O: the fact, the table, the tracker, the feed."""

from __future__ import annotations

import itertools
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetbus import wire
from fleetbus.cli_facts import parse_since
from fleetbus.client.facts import since_fields
from fleetbus.errors import BadInput, BadScope, NotOwner, ProtocolError
from fleetbus.facts import (
    Fact,
    FactFeed,
    FactLimits,
    FactStreamTracker,
    FactTable,
    FactTooLarge,
    MemoryFactRows,
    StampedEvent,
    check_body,
    subscription_topics,
)
from fleetbus.scope import overlaps, parse_scope
from fleetbus.sequence import Sequence

REPO = "git:r"


def scopes(*texts: str) -> list[Any]:
    return [parse_scope(text) for text in texts]


def table(**limits: Any) -> FactTable:
    return FactTable(REPO, Sequence(), FactLimits(**limits))


def held(t: FactTable) -> list[Fact]:
    assert isinstance(t.rows, MemoryFactRows)
    return list(t.rows)


def publish(t: FactTable, *topics: str, text: str = "x", **options: Any) -> Fact:
    options.setdefault("now", 100.0)
    sid = options.pop("sid", "s1")
    out = t.publish(sid, sid.upper(), scopes(*topics), text, **options)
    assert out.reply is not None
    return out.reply


def published(events: list[StampedEvent]) -> list[tuple[bytes, dict[str, Any]]]:
    return [
        (wire.facts_topic(REPO, prefix), event)
        for stamped in events
        for prefix, event in stamped.copies()
    ]


# --- the fact ------------------------------------------------------------------


def test_body_limit_counts_utf8_bytes() -> None:
    """The 4 KiB limit is on UTF-8 bytes, not characters."""
    check_body("é" * 2048)

    with pytest.raises(FactTooLarge) as info:
        check_body("é" * 2049)

    assert info.value.details["limit"] == "fact_bytes"
    assert info.value.exit_code == 2


@pytest.mark.parametrize("body", ["", "   ", None, 3, ["x"]])
def test_malformed_body_is_bad_input(body: Any) -> None:
    """Empty, blank and non-string texts are refused as bad input."""
    with pytest.raises(BadInput):
        check_body(body)


def test_fact_round_trips_through_wire() -> None:
    """A fact's wire form rebuilds the same fact."""
    fact = publish(table(), "src/auth/", "@build", text="hi", kind="gotcha", ttl_s=5)

    assert Fact.from_wire(fact.to_wire()) == fact


def test_malformed_wire_fact_is_protocol_error() -> None:
    """A wire fact with a bad field is a protocol error, not a crash."""
    data = publish(table(), "a.py").to_wire()
    data["kind"] = "rumour"

    with pytest.raises(ProtocolError):
        Fact.from_wire(data)


def test_since_in_the_sdk_is_a_seq_a_time_or_an_age() -> None:
    """An int is a seq, a float or datetime a wall time, a timedelta an age."""
    assert since_fields(None) == {}
    assert since_fields(7) == {"since": 7}
    assert since_fields(12.5) == {"since_time": 12.5}
    moment = datetime(1970, 1, 1, 0, 1, 40, tzinfo=UTC)
    assert since_fields(moment) == {"since_time": 100.0}
    age = since_fields(timedelta(hours=1))["since_time"]
    assert abs(age - (time.time() - 3600)) < 60
    for wrong in (True, "1h"):
        with pytest.raises(BadInput):
            since_fields(wrong)  # type: ignore[arg-type]


def test_since_on_the_command_line() -> None:
    """``--since`` is digits (a seq), an age, also combined, or an ISO time."""
    assert parse_since("120") == 120
    assert parse_since("90s", now=1000.0) == 910.0
    assert parse_since("1h30m", now=10_000.0) == 4_600.0
    assert parse_since("1970-01-01T00:01:40+00:00") == 100.0
    for wrong in ("yesterday", "10x", "1h 30m"):
        with pytest.raises(Exception, match="not a seq number"):
            parse_since(wrong)


# --- publishing and querying -----------------------------------------------------

DELIVERY = [
    # (fact topic, scope of interest, expected overlap)
    ("src/auth/", "src/auth/login.py", True),
    ("src/auth/login.py", "src/auth/**", True),
    ("src/auth/login.py", "src/auth/", True),
    ("src/*.py", "src/a.py", True),
    ("src/a.py", "src/*.py", True),
    ("**/test_*.py", "tests/unit/test_x.py", True),
    ("src/auth/", "src/**/*.md", True),
    ("@build", "@build", True),
    ("@build", "src/", False),
    ("src/a.py", "src/a.py.bak", False),
    ("src/auth/", "src/authz/x.py", False),
    ("docs/", "src/auth/", False),
]


@pytest.mark.parametrize(("topic", "interest", "expected"), DELIVERY)
def test_query_delivers_by_exact_overlap(
    topic: str, interest: str, expected: bool
) -> None:
    """A fact concerns a scope exactly when a topic and the scope overlap."""
    t = table()
    fact = publish(t, topic)

    found, _ = t.query(scopes(interest))

    assert (fact in found) is expected


ALL_SCOPES = [
    "src/auth/login.py",
    "src/auth/",
    "src/",
    "src/*.py",
    "src/a*",
    "src/auth/*.py",
    "**/*.py",
    "**",
    "src/**/test_*.py",
    "a.py",
    "a.py.bak",
    "@build",
    "@db",
    "docs/[a-c]*.md",
    "*/auth/",
]


@pytest.mark.parametrize(
    ("topic", "interest"), list(itertools.product(ALL_SCOPES, ALL_SCOPES))
)
def test_subscription_prefixes_receive_every_overlapping_fact(
    topic: str, interest: str
) -> None:
    """The SUB prefixes of a scope match the PUB topic of every fact on an
    overlapping topic, so filtering on the client never misses one."""
    fact_scope, wanted = parse_scope(topic), parse_scope(interest)
    published_on = wire.facts_topic(REPO, fact_scope.literal_prefix)

    received = any(
        published_on.startswith(prefix) for prefix in subscription_topics(REPO, wanted)
    )

    if overlaps(fact_scope, wanted):
        assert received


@pytest.mark.parametrize(
    ("topic", "interest"),
    [
        ("src/a.py.bak", "src/a.py"),
        ("src/a.py", "src/a.py.bak"),
        ("src/authz/x.py", "src/auth/"),
        ("docs/x.md", "src/"),
        ("src/deep/x.py", "@build"),
    ],
)
def test_subscription_prefixes_skip_names_that_only_share_letters(
    topic: str, interest: str
) -> None:
    """ZeroMQ's prefix filter alone keeps out a fact on a sibling name
    (``a.py`` is not a prefix of ``a.py.bak``'s topic) or elsewhere."""
    published_on = wire.facts_topic(REPO, parse_scope(topic).literal_prefix)

    prefixes = subscription_topics(REPO, parse_scope(interest))

    assert not any(published_on.startswith(prefix) for prefix in prefixes)


def test_one_seq_per_fact_and_prev_per_topic() -> None:
    """A fact on several topics takes one seq; each topic links its own prev."""
    t = table()
    publish(t, "src/a.py")
    out = t.publish("s1", "S1", scopes("src/a.py", "docs/", "@b"), "x", now=1.0)

    copies = list(out.events[0].copies())

    assert {event["seq"] for _, event in copies} == {2}
    prevs = {prefix: event["prev"] for prefix, event in copies}
    assert prevs == {("src", "a.py"): 1, ("docs",): 0, (): 0}


def test_supersede_takes_old_topics_and_kind_and_ends_old() -> None:
    """Superseding ends the old fact with an event; queries show the new one."""
    t = table()
    old = publish(t, "src/auth/", kind="decision", text="use JWT")
    out = t.publish("s2", "S2", [], "use sessions", supersedes=old.id, now=101.0)
    new = out.reply
    assert new is not None

    live, _ = t.query(scopes("src/auth/x.py"))
    every, _ = t.query(scopes("src/auth/x.py"), include_history=True)

    assert live == [new]
    assert new.kind == "decision"
    assert new.topics == old.topics
    assert [f.id for f in every] == [old.id, new.id]
    assert old.state == "superseded"
    assert old.superseded_by == new.id
    ended = out.events[1].event
    assert ended["type"] == "fact.ended"
    assert ended["reason"] == "superseded"
    assert ended["by"] == new.id


def test_supersede_of_an_ended_fact_is_refused() -> None:
    """Only a live fact can be superseded; the refusal changes nothing."""
    t = table()
    old = publish(t, "a.py")
    t.retract("s1", old.id, 1.0)
    seq = t.sequence.seq

    with pytest.raises(BadInput):
        t.publish("s1", "S1", [], "again", supersedes=old.id, now=2.0)

    assert t.sequence.seq == seq


def test_retract_is_for_the_author_only() -> None:
    """Another session may not retract a fact; its author may, once."""
    t = table()
    fact = publish(t, "a.py", sid="s1")

    with pytest.raises(NotOwner):
        t.retract("s2", fact.id, 1.0)
    out = t.retract("s1", fact.id, 1.0)
    again = t.retract("s1", fact.id, 2.0)

    assert [s.event["reason"] for s in out.events] == ["retracted"]
    assert again.events == []
    assert t.query()[0] == []


def test_ttl_expiry_is_an_event_and_keeps_history() -> None:
    """An expired fact leaves queries with an event and stays in the history."""
    t = table()
    fact = publish(t, "a.py", ttl_s=10, now=100.0)

    assert t.next_due() == 110.0
    assert t.tick(109.9).events == []
    out = t.tick(110.0)

    assert [s.event["reason"] for s in out.events] == ["expired"]
    assert out.changed == [fact]
    assert t.query()[0] == []
    assert t.query(include_history=True)[0] == [fact]
    assert t.next_due() is not None


def test_retention_by_count_drops_oldest_with_events() -> None:
    """Past the count bound the oldest facts go, each drop an event."""
    t = table(max_facts=3)
    facts = [publish(t, f"f{n}.py") for n in range(3)]

    out = t.publish("s1", "S1", scopes("new.py"), "x", now=100.0)

    dropped = [s.event for s in out.events if s.event["type"] == "fact.dropped"]
    assert [e["ids"] for e in dropped] == [[facts[0].id]]
    assert dropped[0]["limit"] == "count"
    assert out.dropped == [facts[0].id]
    assert len(t) == 3


def test_retention_by_age_drops_old_facts_in_tick() -> None:
    """Facts older than the age bound are dropped at the tick, with events."""
    t = table(max_age_s=50)
    first = publish(t, "a.py", now=100.0)
    publish(t, "b.py", now=120.0)

    assert t.next_due() == 150.0
    out = t.tick(155.0)

    assert out.dropped == [first.id]
    assert [s.event["limit"] for s in out.events] == ["age"]
    assert len(t) == 1


def test_query_filters_and_pages() -> None:
    """Kind, author, since and limit filter; a since-query pages forwards."""
    t = table()
    a = publish(t, "a.py", kind="note", sid="s1", now=1.0)
    b = publish(t, "a.py", kind="gotcha", sid="s2", now=2.0)
    c = publish(t, "a.py", kind="gotcha", sid="s2", now=3.0)

    assert t.query(kind="gotcha")[0] == [b, c]
    assert t.query(author="S1")[0] == [a]
    assert t.query(since=a.seq)[0] == [b, c]
    assert t.query(since_wall=3.0)[0] == [c]
    assert t.query(limit=2) == ([b, c], True)
    assert t.query(since=0, limit=2) == ([a, b], True)
    assert t.query(ids={a.id, c.id})[0] == [a, c]


def test_changed_since_includes_ends() -> None:
    """A catch-up query returns facts published or ended after a seq."""
    t = table()
    a = publish(t, "a.py")
    mark = t.sequence.seq
    b = publish(t, "a.py")
    t.retract("s1", a.id, 2.0)

    found, _ = t.query(changed_since=mark)

    assert found == [b, a]
    assert a.state == "retracted"


def test_changed_since_on_scopes_reads_changes_in_order_after_restore() -> None:
    """A catch-up on scopes keeps overlapping changes only, in order of change,
    the same in a table restored from the store."""
    t = table()
    a = publish(t, "src/a.py")
    publish(t, "docs/")
    mark = t.sequence.seq
    b = publish(t, "src/b.py")
    publish(t, "docs/x.md")
    t.retract("s1", a.id, 2.0)
    copy = FactTable(REPO, Sequence(t.sequence.seq), FactLimits())
    copy.restore(Fact.from_wire(f.to_wire()) for f in held(t))

    for each in (t, copy):
        found, more = each.query(scopes("src/"), changed_since=mark, limit=1)

        assert [f.id for f in found] == [b.id]
        assert more
        assert each.query(scopes("src/"), changed_since=b.seq)[0] == [a]


def test_bad_topics_and_kinds_are_refused() -> None:
    """No topic, too many topics, a bad kind or TTL: refused, nothing changed."""
    t = table(topics_per_fact=2)

    with pytest.raises(BadInput):
        t.publish("s1", "S1", [], "x", now=1.0)
    with pytest.raises(FactTooLarge):
        t.publish("s1", "S1", scopes("a", "b", "c"), "x", now=1.0)
    with pytest.raises(BadInput):
        t.publish("s1", "S1", scopes("a"), "x", kind="rumour", now=1.0)
    with pytest.raises(BadInput):
        t.publish("s1", "S1", scopes("a"), "x", ttl_s=0, now=1.0)
    with pytest.raises(BadScope):
        parse_scope("../x")

    assert t.sequence.seq == 0
    assert len(t) == 0


def test_restore_rebuilds_queries_and_expiry() -> None:
    """A table restored from stored facts answers and expires like the original."""
    t = table()
    fact = publish(t, "src/", ttl_s=5, now=100.0)
    copy = FactTable(REPO, Sequence(t.sequence.seq), FactLimits())

    copy.restore(Fact.from_wire(f.to_wire()) for f in held(t))

    assert copy.query(scopes("src/x.py"))[0] == [fact]
    assert copy.next_due() == 105.0


# --- the tracker and the feed ----------------------------------------------------


def test_tracker_spots_a_dropped_event() -> None:
    """Dropping one event of a stream shows as a gap at the next one."""
    t = table()
    tracker = FactStreamTracker()
    tracker.subscribed(subscription_topics(REPO, parse_scope("src/")), at=0)
    sent = []
    for _ in range(3):
        sent += published(t.publish("s1", "S1", scopes("src/a.py"), "x", now=1).events)

    first = tracker.check(*sent[0])
    third = tracker.check(*sent[2])

    assert first.fresh
    assert first.missed_after is None
    assert third.fresh
    assert third.missed_after == 1


def test_tracker_takes_first_event_of_new_stream_after_snapshot() -> None:
    """On an unseen stream, prev up to the snapshot seq is no gap."""
    t = table()
    publish(t, "src/a.py")
    publish(t, "src/a.py")
    tracker = FactStreamTracker()
    tracker.subscribed(subscription_topics(REPO, parse_scope("src/")), at=2)
    old = published(t.publish("s1", "S1", scopes("src/a.py"), "x", now=1).events)

    verdict = tracker.check(*old[0])

    assert verdict.fresh
    assert verdict.missed_after is None


def test_tracker_ignores_events_in_the_snapshot_and_copies() -> None:
    """Events already in the retained set, and second copies, are not fresh."""
    t = table()
    tracker = FactStreamTracker()
    tracker.subscribed([wire.facts_subtree(REPO, ())], at=1)
    before = published(t.publish("s1", "S1", scopes("a.py"), "x", now=1).events)
    after = published(t.publish("s1", "S1", scopes("a.py", "b/"), "x", now=1).events)

    assert not tracker.check(*before[0]).fresh
    assert tracker.check(*after[0]).fresh
    assert not tracker.check(*after[1]).fresh


def test_feed_merges_retained_and_live_without_repeats() -> None:
    """A fact in the retained set and on the live stream is told once."""
    t = table()
    feed = FactFeed(REPO)
    _, prefixes = feed.follow(scopes("src/auth/login.py"))
    live_before = published(
        t.publish("s1", "S1", scopes("src/auth/"), "a", now=1).events
    )
    retained, _ = t.query(scopes("src/auth/login.py"))
    feed.tracker.subscribed(prefixes, t.sequence.seq)
    live_after = published(
        t.publish("s1", "S1", scopes("src/auth/", "src/*.md"), "b", now=1).events
    )

    told = feed.retained(retained)
    for topic, event in live_before + live_after:
        told += feed.live(topic, event)[0]

    assert [(e.type, e.fact.body if e.fact else None) for e in told] == [
        ("published", "a"),
        ("published", "b"),
    ]


def test_feed_tells_ends_of_known_facts_only() -> None:
    """Retraction of a fact the subscriber was shown is told; others are not."""
    t = table()
    feed = FactFeed(REPO)
    _, prefixes = feed.follow(scopes("src/"))
    feed.tracker.subscribed(prefixes, 0)
    known = publish(t, "src/a.py")
    feed.retained([known])
    out = t.retract("s1", known.id, 2.0)

    told = [e for topic, ev in published(out.events) for e in feed.live(topic, ev)[0]]

    assert [(e.type, e.id) for e in told] == [("retracted", known.id)]


def test_feed_filters_facts_that_do_not_overlap() -> None:
    """A fact received on an ancestor topic but not overlapping is not told."""
    t = table()
    feed = FactFeed(REPO)
    _, prefixes = feed.follow(scopes("src/auth/login.py"))
    feed.tracker.subscribed(prefixes, 0)
    sent = published(t.publish("s1", "S1", scopes("src/*.md"), "x", now=1).events)

    told, missed = feed.live(*sent[0])

    assert told == []
    assert missed is None


_FEED_SCOPES = [
    "src/",
    "src/a.py",
    "src/*.py",
    "src/b/**",
    "docs/x.md",
    "@build",
    "*.md",
]
_FEED_TOPICS = [*_FEED_SCOPES, "src/b/c/d.py", "src/c.txt", "lib/x.py", "@other", "**"]


@pytest.mark.parametrize("seed", range(8))
def test_feed_wants_exactly_what_overlaps_a_followed_scope(seed: int) -> None:
    """The feed's index of followed scopes answers as a scan of them would."""
    rng = random.Random(seed)
    feed = FactFeed(REPO)
    followed = scopes(*rng.sample(_FEED_SCOPES, rng.randint(1, 4)))
    feed.follow(followed)

    for text in _FEED_TOPICS:
        fact = Fact("f1", 1, tuple(scopes(text)), "x", "note", "s", "n", 1.0)
        expected = any(overlaps(fact.topics[0], scope) for scope in followed)
        assert feed.wants(fact) == expected, text


def test_tracker_base_is_the_earliest_subscription_covering_a_topic() -> None:
    """Exact and subtree prefixes, nested: the earliest retained set whose
    prefix starts the topic counts."""
    tracker = FactStreamTracker()
    subscribed: dict[bytes, int] = {}
    for text, at in (("src/a/b.py", 7), ("src/", 3), ("@build", 9)):
        prefixes = subscription_topics(REPO, parse_scope(text))
        tracker.subscribed(prefixes, at)
        for prefix in prefixes:
            subscribed.setdefault(prefix, at)
    topics = [
        wire.facts_topic(REPO, prefix)
        for prefix in [(), ("src",), ("src", "a"), ("src", "a", "b.py"), ("docs",)]
    ]
    topics.append(wire.facts_topic("git:other", ("src",)))

    for topic in topics:
        bases = [at for prefix, at in subscribed.items() if topic.startswith(prefix)]
        assert tracker.base(topic) == min(bases, default=None), topic
    assert tracker.base(topics[1]) == 3
    assert tracker.base(topics[-1]) is None
