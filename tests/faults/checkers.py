"""Checkers of fleetbus's promises over recorded histories, events and stores.

Each checker raises :class:`Violation` naming the first broken promise, with
enough context to turn the run into a regression test.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fleetbus.claims import modes_conflict
from fleetbus.scope import Scope, ScopeIndex, overlaps, parse_scope
from tests.faults.harness import Observed
from tests.faults.history import Op

Ranges = list[tuple[int, int]]


class Violation(AssertionError):
    """A promise was broken."""


def lost_ranges(observed: Observed, restarts: Iterable[tuple[float, float]]) -> Ranges:
    """The sequence numbers a crash may have kept from being published.

    A batch committed just before a SIGKILL is never published, so after a
    restart a stream may link past events nobody saw. Such events lie after
    the last event seen before the broker went down and before the first one
    seen after it came back; any other gap is a lost event.
    """
    times = sorted((t, e["seq"]) for t, _topic, e in observed.events)
    ranges: Ranges = []
    for down, up in restarts:
        before = max((seq for t, seq in times if t <= down), default=0)
        after = min((seq for t, seq in times if t >= up), default=1 << 62)
        ranges.append((before, after))
    return ranges


def _explained(prev: int, ranges: Ranges) -> bool:
    return any(low < prev < high for low, high in ranges)


@dataclass
class StreamReport:
    """What the claims-stream replay found."""

    events: int = 0
    grants: int = 0
    gaps: int = 0
    snapshots: int = 0
    max_fence: int = 0
    released: dict[str, list[tuple[float, str]]] = field(default_factory=dict)


@dataclass
class _Row:
    sid: str
    scope: Scope
    mode: str


class _Table:
    """The claims held, indexed by scope so each new row is checked quickly."""

    def __init__(self) -> None:
        self.rows: dict[str, _Row] = {}
        self.index: ScopeIndex[str] = ScopeIndex()

    def add(self, data: dict[str, Any], where: str) -> None:
        """Hold a row, refusing it if it excludes a row of another session."""
        row = _Row(data["sid"], parse_scope(data["scope"]), data["mode"])
        for _scope, other_id in self.index.overlapping(row.scope):
            other = self.rows[other_id]
            if other.sid != row.sid and modes_conflict(other.mode, row.mode):  # type: ignore[arg-type]
                raise Violation(
                    f"{where}: {data['id']} ({row.sid} {row.mode} {data['scope']}) "
                    f"and {other_id} ({other.sid} {other.mode} {other.scope.text}) "
                    "held at once"
                )
        self.rows[data["id"]] = row
        self.index.add(row.scope, data["id"])

    def remove(self, cid: str) -> _Row | None:
        """Stop holding a row."""
        row = self.rows.pop(cid, None)
        if row is not None:
            self.index.discard(row.scope, cid)
        return row


def check_claims_stream(
    observed: Observed,
    restarts: Iterable[tuple[float, float]] = (),
    *,
    gaps_allowed: bool = False,
) -> StreamReport:
    """Replay the observed claims stream and check it.

    - events follow each other without gaps or duplicates, except over
      events a crash kept from being published (or anywhere when
      ``gaps_allowed``: a slow reader);
    - no two overlapping exclusive claims of different sessions are held at
      once, in any snapshot or after any event;
    - every grant's fence is its ``seq`` and fences strictly increase.
    """
    ranges = lost_ranges(observed, restarts)
    report = StreamReport()
    table = _Table()
    last = -1
    timeline: list[tuple[float, int, Any]] = [
        (t, 0, snap) for t, snap in observed.snapshots
    ]
    timeline.extend(
        (t, 1, event) for t, topic, event in observed.events if topic[:1] == b"c"
    )
    timeline.sort(key=lambda item: (item[0], item[1]))
    for when, kind, item in timeline:
        if kind == 0:
            report.snapshots += 1
            table = _Table()
            for row in item["claims"]:
                table.add(row, f"snapshot at head {item['head']}")
            last = int(item["head"])
            continue
        event = item
        if event["seq"] <= last:
            continue
        if event["prev"] != last:
            report.gaps += 1
            if not gaps_allowed and not _explained(event["prev"], ranges):
                raise Violation(
                    f"gap in the claims stream outside a restart: applied {last}, "
                    f"then an event with prev {event['prev']} (seq {event['seq']})"
                )
            continue
        report.events += 1
        _apply(event, table, report, when)
        last = int(event["seq"])
    return report


def _apply(
    event: dict[str, Any], table: _Table, report: StreamReport, when: float
) -> None:
    kind = event["type"]
    if kind == "claim.granted":
        report.grants += 1
        if event["fence"] != event["seq"]:
            raise Violation(f"fence {event['fence']} is not seq {event['seq']}")
        if event["fence"] <= report.max_fence:
            raise Violation(
                f"fence {event['fence']} after fence {report.max_fence}: not increasing"
            )
        report.max_fence = event["fence"]
        for row in event["claims"]:
            table.add(row, f"grant {event['grant']} at seq {event['seq']}")
    elif kind == "claim.released":
        for cid in event["ids"]:
            held = table.remove(cid)
            if held is not None:
                report.released.setdefault(held.sid, []).append((when, event["reason"]))


def check_fact_streams(
    observed: Observed, restarts: Iterable[tuple[float, float]] = ()
) -> int:
    """Every facts topic's events are linked by ``prev``, without duplicates.

    The first event seen on a topic may link to anything earlier; a gap is
    allowed only over events a crash kept from being published (see
    :func:`lost_ranges`). Returns the number of events checked.
    """
    ranges = lost_ranges(observed, restarts)
    last: dict[bytes, int] = {}
    count = 0
    for _when, topic, event in observed.events:
        if topic[:1] != b"f":
            continue
        count += 1
        seen = last.get(topic)
        if seen is not None:
            if event["seq"] <= seen:
                raise Violation(f"duplicate or reordered fact event {event['seq']}")
            if event["prev"] != seen and not _explained(event["prev"], ranges):
                raise Violation(
                    f"gap on fact topic {topic!r}: last {seen}, prev {event['prev']}"
                )
        last[topic] = int(event["seq"])
    return count


def check_fences(ops: Iterable[Op]) -> int:
    """Fences of acknowledged claims are unique per grant and follow real time.

    If claim A was acknowledged before claim B was invoked, A's fence is lower.
    Returns the number of grants checked.
    """
    claims = [op for op in ops if op.op == "claim" and op.ok]
    by_grant: dict[str, int] = {}
    by_fence: dict[int, str] = {}
    for op in claims:
        grant, fence = op.value["grant"], op.value["fence"]
        if by_grant.setdefault(grant, fence) != fence:
            raise Violation(f"grant {grant} came with two fences")
        if by_fence.setdefault(fence, grant) != grant:
            raise Violation(f"fence {fence} given to two grants")
    ended = sorted(claims, key=lambda op: op.end)
    highest = 0
    j = 0
    for op in sorted(claims, key=lambda op: op.invoked):
        while j < len(ended) and ended[j].end < op.invoked:
            highest = max(highest, ended[j].value["fence"])
            j += 1
        if op.value["fence"] <= highest:
            raise Violation(
                f"{op.process} got fence {op.value['fence']} after fence {highest} "
                "was acknowledged"
            )
    return len(by_grant)


def check_durable(ops: Iterable[Op], store: dict[str, Any], killed: float) -> int:
    """Everything acknowledged before ``killed`` is in the store.

    A claim counts unless a release of its grant was invoked before the kill;
    a fact counts in any state (a retraction keeps it as history). Returns the
    number of acknowledged changes checked.
    """
    ops = list(ops)
    releasing = {
        op.args["grant"] for op in ops if op.op == "release" and op.invoked < killed
    }
    checked = 0
    for op in ops:
        if not op.ok or op.end >= killed:
            continue
        if op.op == "claim" and op.value["grant"] not in releasing:
            checked += 1
            for row in op.value["claims"]:
                if row["id"] not in store["claims"]:
                    raise Violation(
                        f"acknowledged claim {row['id']} of {op.process} "
                        "is missing after the crash"
                    )
        elif op.op == "publish":
            checked += 1
            if op.value["id"] not in store["facts"]:
                raise Violation(
                    f"acknowledged fact {op.value['id']} of {op.process} is missing"
                )
    return checked


def check_converged(
    snapshot: dict[str, Any], replicas: dict[str, dict[str, Any]]
) -> None:
    """Every replica holds exactly the broker's table at the broker's head."""
    want = _table(snapshot)
    for sid, replica in replicas.items():
        if replica["head"] != snapshot["head"]:
            raise Violation(
                f"replica of {sid} is at head {replica['head']}, "
                f"broker at {snapshot['head']}"
            )
        got = _table(replica)
        if got != want:
            raise Violation(f"replica of {sid} differs: {got ^ want}")


def _table(state: dict[str, Any]) -> frozenset[tuple[Any, ...]]:
    claims = {
        ("claim", r["id"], r["sid"], r["scope"], r["mode"], r["fence"])
        for r in state["claims"]
    }
    sessions = {("session", s["sid"]) for s in state["sessions"]}
    return frozenset(claims | sessions)


def check_late_joiner(
    ops: Iterable[Op], scopes: list[str], facts: list[dict[str, Any]]
) -> int:
    """A late joiner's query returns exactly the live facts on its scopes.

    Acknowledged publications not retracted must be there; anything else
    must come from a publication or retraction whose outcome is unknown, or
    from the broker itself. Returns the number of facts expected.
    """
    ops = list(ops)
    wanted = [parse_scope(text) for text in scopes]

    def concerns(topics: list[str]) -> bool:
        return any(overlaps(parse_scope(t), w) for t in topics for w in wanted)

    retracted = {op.args["id"] for op in ops if op.op == "retract" and op.ok}
    maybe_retracted = {op.args["id"] for op in ops if op.op == "retract" and not op.ok}
    definite = {
        op.value["id"]
        for op in ops
        if op.op == "publish" and op.ok and concerns(op.args["topics"])
    } - retracted
    maybe_texts = {op.args["text"] for op in ops if op.op == "publish" and not op.ok}
    got = {fact["id"]: fact for fact in facts}
    missing = definite - set(got) - maybe_retracted
    if missing:
        raise Violation(f"late joiner is missing facts {sorted(missing)}")
    for fact_id, fact in got.items():
        if fact_id in definite or fact["sid"] == "fleetbus":
            continue
        if fact["body"] not in maybe_texts:
            raise Violation(f"late joiner got unexpected fact {fact_id}: {fact}")
        if not concerns(fact["topics"]):
            raise Violation(f"late joiner got fact {fact_id} off its scopes")
    return len(definite)
