"""The checkers catch what they are meant to: each fed a broken history."""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults import checkers
from tests.faults.checkers import Violation
from tests.faults.harness import Observed
from tests.faults.history import FAIL, OK, UNKNOWN, Op

TOPIC = b"cfault-repo\x00"
FACT_TOPIC = b"ffault-repo\x00src\x00\x01"


def row(cid: str, sid: str, scope: str, mode: str = "exclusive") -> dict[str, Any]:
    """A claim row as the stream carries it."""
    return {"id": cid, "sid": sid, "scope": scope, "mode": mode}


def granted(seq: int, prev: int, *rows: dict[str, Any]) -> dict[str, Any]:
    """A ``claim.granted`` event."""
    return {
        "type": "claim.granted",
        "seq": seq,
        "prev": prev,
        "fence": seq,
        "grant": f"g:{seq}",
        "claims": list(rows),
    }


def released(seq: int, prev: int, *ids: str) -> dict[str, Any]:
    """A ``claim.released`` event."""
    return {
        "type": "claim.released",
        "seq": seq,
        "prev": prev,
        "ids": list(ids),
        "reason": "released",
    }


def observed(*events: dict[str, Any], topic: bytes = TOPIC) -> Observed:
    """An observation: an empty snapshot, then ``events`` one second apart."""
    seen = Observed()
    seen.snapshots.append((0.0, {"head": 0, "claims": []}))
    seen.events.extend((float(n + 1), topic, e) for n, e in enumerate(events))
    return seen


def test_overlapping_exclusive_claims_are_caught() -> None:
    """Two sessions holding overlapping exclusive claims is a violation."""
    seen = observed(
        granted(1, 0, row("a", "s1", "src/")),
        granted(2, 1, row("b", "s2", "src/*.py")),
    )
    with pytest.raises(Violation, match="held at once"):
        checkers.check_claims_stream(seen)


def test_shared_claims_and_released_scopes_pass() -> None:
    """Shared claims coexist, and a released scope may be granted again."""
    seen = observed(
        granted(1, 0, row("a", "s1", "src/", "shared")),
        granted(2, 1, row("b", "s2", "src/a.py", "shared")),
        released(3, 2, "a", "b"),
        granted(4, 3, row("c", "s3", "src/")),
    )
    report = checkers.check_claims_stream(seen)
    assert report.grants == 3


def test_a_fence_that_does_not_increase_is_caught() -> None:
    """A grant whose fence is not above every earlier one is a violation."""
    late = granted(3, 2, row("b", "s2", "docs/"))
    late["fence"] = 1
    seen = observed(granted(1, 0, row("a", "s1", "src/")), released(2, 1, "a"), late)
    with pytest.raises(Violation, match="fence"):
        checkers.check_claims_stream(seen)


def test_a_gap_is_allowed_only_over_events_a_crash_kept_back() -> None:
    """Regression: a crash between commit and publish is not a lost event."""
    seen = observed(
        granted(1, 0, row("a", "s1", "src/")),
        granted(5, 4, row("b", "s1", "docs/")),
    )
    with pytest.raises(Violation, match="gap"):
        checkers.check_claims_stream(seen)
    assert checkers.check_claims_stream(seen, [(1.5, 1.8)]).gaps == 1


def test_a_fact_topic_gap_far_after_a_restart_is_still_explained() -> None:
    """Regression: the next event on a quiet topic may come long after restart."""
    events = [
        {"type": "fact.published", "seq": 3, "prev": 1},
        {"type": "fact.published", "seq": 9, "prev": 6},
    ]
    seen = observed(*events, topic=FACT_TOPIC)
    seen.events.insert(1, (1.5, TOPIC, granted(4, 0)))
    with pytest.raises(Violation):
        checkers.check_fact_streams(seen)
    seen.events[2] = (60.0, FACT_TOPIC, events[1])
    seen.events.insert(2, (10.0, TOPIC, granted(7, 4)))
    assert checkers.check_fact_streams(seen, [(2.0, 3.0)]) == 2


def op(
    name: str, invoked: float, completed: float | None, outcome: str, **value: Any
) -> Op:
    """An operation of process ``p``."""
    return Op("p", int(invoked * 10), name, value.pop("args", {}), invoked,
              completed, outcome, value)  # fmt: skip


def test_fences_out_of_real_time_order_are_caught() -> None:
    """A later grant with a lower fence than an acknowledged one is caught."""
    ops = [
        op("claim", 1.0, 2.0, OK, grant="g:9", fence=9),
        op("claim", 3.0, 4.0, OK, grant="g:5", fence=5),
    ]
    with pytest.raises(Violation, match="after fence 9"):
        checkers.check_fences(ops)
    assert checkers.check_fences(ops[:1]) == 1


def test_an_acknowledged_claim_missing_after_a_crash_is_caught() -> None:
    """A claim acknowledged before the kill must be in the store, unless released."""
    claim = op("claim", 1.0, 2.0, OK, grant="g:1", fence=1, claims=[{"id": "g:1.1"}])
    with pytest.raises(Violation, match="missing"):
        checkers.check_durable([claim], {"claims": {}, "facts": {}}, killed=3.0)
    releasing = op("release", 2.5, None, UNKNOWN, args={"grant": "g:1"})
    empty: dict[str, Any] = {"claims": {}, "facts": {}}
    assert checkers.check_durable([claim, releasing], empty, killed=3.0) == 0
    assert not checkers.check_durable([claim], {"claims": {}, "facts": {}}, killed=1.5)


def test_a_late_joiner_must_see_exactly_the_live_facts() -> None:
    """A late joiner missing a fact, or seeing one never sent, is caught."""
    published = op("publish", 1.0, 2.0, OK, id="f1", args={"topics": ["src/a.py"]})
    refused = op("publish", 1.0, 2.0, FAIL, args={"topics": ["src/"], "text": "x"})
    fact = {"id": "f1", "sid": "w", "body": "b", "topics": ["src/a.py"]}
    assert checkers.check_late_joiner([published, refused], ["src/"], [fact]) == 1
    with pytest.raises(Violation, match="missing"):
        checkers.check_late_joiner([published], ["src/"], [])
    stray = {"id": "f2", "sid": "w", "body": "never sent", "topics": ["src/"]}
    with pytest.raises(Violation, match="unexpected"):
        checkers.check_late_joiner([published], ["src/"], [fact, stray])


def test_a_replica_that_differs_is_caught() -> None:
    """A replica at another head, or with other claims, is caught."""
    broker = {"head": 4, "claims": [{**row("a", "s", "x"), "fence": 2}], "sessions": []}
    checkers.check_converged(broker, {"s": dict(broker)})
    with pytest.raises(Violation, match="differs"):
        checkers.check_converged(broker, {"s": {**broker, "claims": []}})
    with pytest.raises(Violation, match="head"):
        checkers.check_converged(broker, {"s": {**broker, "head": 3}})
