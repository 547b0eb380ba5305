"""The claim table: grants, conflicts, waits, deadlocks, leases and replicas."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from fleetbus.claims import (
    Claim,
    ClaimTable,
    ClaimView,
    Limits,
    Mode,
    Now,
    Outcome,
    SessionInfo,
)
from fleetbus.errors import (
    BadInput,
    Conflict,
    Deadlock,
    LimitExceeded,
    NotOwner,
    ProtocolError,
    UnknownSession,
)
from fleetbus.scope import Scope, parse_scope
from fleetbus.sequence import Sequence

REPO = "git:0123456789abcdef"
T0 = Now(wall=1_700_000_000.0, mono=1000.0)


def at(seconds: float) -> Now:
    """The time ``seconds`` after T0 on both clocks."""
    return Now(T0.wall + seconds, T0.mono + seconds)


def scopes(*texts: str) -> list[Scope]:
    return [parse_scope(text) for text in texts]


@dataclass
class Fleet:
    """A table driven through short helpers, recording every event it emits."""

    table: ClaimTable
    events: list[dict[str, Any]] = field(default_factory=list)
    rids: itertools.count[int] = field(default_factory=itertools.count)

    def record(self, outcome: Outcome) -> Outcome:
        self.events.extend(outcome.events)
        return outcome

    def join(
        self, sid: str, *, leased: bool = True, lease_s: float = 5.0, now: Now = T0
    ) -> Outcome:
        name = {"s1": "alice", "s2": "bob", "s3": "carol"}.get(sid, sid)
        return self.record(
            self.table.join(sid, name, {}, leased=leased, lease_s=lease_s, now=now)
        )

    def claim(
        self,
        sid: str,
        *texts: str,
        mode: Mode = "exclusive",
        intent: str = "work",
        ttl_s: float | None = None,
        wait_s: float | None = None,
        rid: str | None = None,
        now: Now = T0,
    ) -> Outcome:
        return self.record(
            self.table.claim(
                sid,
                scopes(*texts),
                mode=mode,
                intent=intent,
                ttl_s=ttl_s,
                wait_s=wait_s,
                rid=rid or f"r{next(self.rids)}",
                now=now,
            )
        )

    def release(self, sid: str, now: Now = T0, **selector: Any) -> Outcome:
        if "scopes" in selector:
            selector["scopes"] = scopes(*selector["scopes"])
        return self.record(self.table.release(sid, now=now, **selector))

    def keepalive(self, now: Now, *sids: str) -> None:
        for sid in sids or list(self.table.view.sessions):
            self.table.touch(sid, now)

    def tick(self, now: Now) -> Outcome:
        return self.record(self.table.tick(now))

    def held(self, sid: str | None = None) -> list[str]:
        return [row.scope.text for row in self.table.view.claims(sid)]

    def replica(self) -> ClaimView:
        view = ClaimView()
        for event in self.events:
            view.apply(event)
        return view


@pytest.fixture
def fleet() -> Fleet:
    fleet = Fleet(ClaimTable(REPO, Sequence()))
    for sid in ("s1", "s2", "s3"):
        fleet.join(sid)
    return fleet


def kinds(outcome: Outcome) -> list[tuple[str, Any]]:
    return [(e["type"], e.get("reason")) for e in outcome.events]


# -- grants and conflicts ----------------------------------------------------


def test_grant_replies_with_rows_sharing_grant_and_fence(fleet: Fleet) -> None:
    """A multi-scope grant is one event whose rows share grant and fence = seq."""
    out = fleet.claim("s1", "src/a.py", "@db", intent="refactor login")

    (event,) = out.events
    assert event["type"] == "claim.granted"
    assert out.reply is not None
    assert out.reply["fence"] == event["seq"] == event["fence"]
    rows = out.reply["claims"]
    assert [row["scope"] for row in rows] == ["src/a.py", "@db"]
    assert {row["grant"] for row in rows} == {out.reply["grant"]}
    assert {row["fence"] for row in rows} == {event["seq"]}
    assert rows[0]["name"] == "alice"
    assert rows[0]["since"] == T0.wall
    assert rows[0]["expires"] is None


def test_conflict_names_every_holder_readably(fleet: Fleet) -> None:
    """A refusal lists every conflicting row and says who, since when and why."""
    fleet.claim("s1", "src/a.py", mode="shared", intent="refactor login")
    fleet.claim("s2", "src/", mode="shared", intent="rename")

    with pytest.raises(Conflict) as info:
        fleet.claim("s3", "src/*.py")

    holders = info.value.details["holders"]
    assert [(h["sid"], h["scope"]) for h in holders] == [
        ("s1", "src/a.py"),
        ("s2", "src/"),
    ]
    assert set(holders[0]) == {
        "sid",
        "name",
        "scope",
        "mode",
        "intent",
        "since",
        "expires",
    }
    assert "src/a.py is held (shared) by alice (sid s1) since 2023-11-14" in str(
        info.value
    )
    assert "intent 'refactor login'" in str(info.value)
    assert "bob (sid s2)" in str(info.value)


def test_a_holder_without_intent_is_described_without_quotes(fleet: Fleet) -> None:
    """An empty intent reads as such, not as a pair of quotes."""
    fleet.claim("s1", "@db", intent="")

    with pytest.raises(Conflict) as info:
        fleet.claim("s2", "@db")

    assert str(info.value).endswith(": no intent given")


@pytest.mark.parametrize(
    ("held", "wanted", "granted"),
    [
        ("shared", "shared", True),
        ("shared", "exclusive", False),
        ("exclusive", "shared", False),
        ("exclusive", "exclusive", False),
    ],
)
def test_mode_matrix(fleet: Fleet, held: Mode, wanted: Mode, granted: bool) -> None:
    """Shared claims coexist; an exclusive one excludes either mode."""
    fleet.claim("s1", "src/a.py", mode=held)

    if granted:
        fleet.claim("s2", "src/a.py", mode=wanted)
        assert fleet.held("s2") == ["src/a.py"]
    else:
        with pytest.raises(Conflict):
            fleet.claim("s2", "src/a.py", mode=wanted)


def test_disjoint_scopes_do_not_conflict(fleet: Fleet) -> None:
    """Exclusive claims on scopes that share no path are both granted."""
    fleet.claim("s1", "src/a.py", "@db")
    fleet.claim("s2", "src/b.py", "@build", "lib/")

    assert fleet.held("s2") == ["src/b.py", "@build", "lib/"]


def test_multi_scope_claim_is_all_or_nothing(fleet: Fleet) -> None:
    """One conflicting scope refuses the whole request and grants nothing."""
    fleet.claim("s1", "src/b.py")
    before = fleet.table.view.snapshot()
    seq = fleet.table.sequence.seq

    with pytest.raises(Conflict) as info:
        fleet.claim("s2", "src/a.py", "src/b.py")

    assert [h["scope"] for h in info.value.details["holders"]] == ["src/b.py"]
    assert fleet.table.view.snapshot() == before
    assert fleet.table.sequence.seq == seq


def test_session_never_conflicts_with_itself(fleet: Fleet) -> None:
    """Claiming over one's own exclusive claim is granted as a new grant."""
    first = fleet.claim("s1", "src/")
    second = fleet.claim("s1", "src/a.py", mode="shared")

    assert first.reply is not None
    assert second.reply is not None
    assert second.reply["fence"] > first.reply["fence"]
    assert fleet.held("s1") == ["src/", "src/a.py"]


def test_duplicate_scopes_in_one_request_make_one_row(fleet: Fleet) -> None:
    """Naming a scope twice in one claim stores it once."""
    out = fleet.claim("s1", "src/a.py", "src/a.py")

    assert out.reply is not None
    assert len(out.reply["claims"]) == 1


def test_fences_strictly_increase(fleet: Fleet) -> None:
    """Every grant's fence is above the previous one, whatever happened between."""
    fences = []
    for n in range(5):
        out = fleet.claim("s1", f"f{n}")
        assert out.reply is not None
        fences.append(out.reply["fence"])
        fleet.release("s1", all=True)

    assert fences == sorted(set(fences))


def test_events_carry_seq_and_chained_prev(fleet: Fleet) -> None:
    """Each event's prev is the seq of the one before it on the claims stream."""
    fleet.claim("s1", "a")
    fleet.claim("s2", "a", wait_s=10)
    fleet.release("s1", all=True)
    fleet.table.sequence.next_number()
    fleet.table.leave("s3", T0)

    seqs = [event["seq"] for event in fleet.events]
    prevs = [event["prev"] for event in fleet.events]
    assert prevs == [0, *seqs[:-1]]
    assert seqs == sorted(set(seqs))


def test_row_and_session_round_trip_their_wire_form(fleet: Fleet) -> None:
    """Claim and SessionInfo survive to_wire/from_wire unchanged."""
    fleet.claim("s1", "src/**/*.py", ttl_s=30)
    row = fleet.table.view.claims("s1")[0]
    info = fleet.table.view.sessions["s1"]

    assert Claim.from_wire(row.to_wire()) == row
    assert SessionInfo.from_wire(info.to_wire()) == info


# -- waiting -----------------------------------------------------------------


def test_waiting_claim_is_queued_then_granted_on_release(fleet: Fleet) -> None:
    """A conflicting wait is queued and granted, as a deferred reply, on release."""
    fleet.claim("s1", "src/a.py")

    queued = fleet.claim("s2", "src/a.py", wait_s=30, rid="w1")
    assert queued.queued == 1
    assert queued.reply is None
    assert kinds(queued) == [("wait.queued", None)]
    assert fleet.table.is_waiting("s2", "w1")

    out = fleet.release("s1", all=True, now=at(1))
    assert kinds(out) == [
        ("claim.released", "released"),
        ("claim.granted", None),
        ("wait.ended", "granted"),
    ]
    ((sid, rid, reply),) = out.deferred
    assert (sid, rid, reply["ok"]) == ("s2", "w1", True)
    assert reply["fence"] == out.events[1]["seq"]
    assert fleet.held("s2") == ["src/a.py"]
    assert not fleet.table.is_waiting("s2", "w1")


def test_free_waiting_claim_is_granted_at_once(fleet: Fleet) -> None:
    """A wait with nothing in its way is granted directly, not queued."""
    out = fleet.claim("s1", "src/a.py", wait_s=30)

    assert out.queued is None
    assert out.reply is not None


def test_retried_wait_is_not_queued_twice(fleet: Fleet) -> None:
    """A wait request retried with the same rid reports its place, emits nothing."""
    fleet.claim("s1", "a")
    fleet.claim("s2", "a", wait_s=30, rid="w1")

    again = fleet.claim("s2", "a", wait_s=30, rid="w1")

    assert again.events == []
    assert again.queued == 1
    assert len(fleet.table.view.waiters) == 1


def test_waiters_are_granted_in_fifo_order(fleet: Fleet) -> None:
    """Of two waiters for one scope, the first is granted first."""
    fleet.join("s4")
    fleet.claim("s1", "a")
    fleet.claim("s3", "a", wait_s=30, rid="w3")
    fleet.claim("s2", "a", wait_s=30, rid="w2")

    out = fleet.release("s1", all=True)
    assert [d[:2] for d in out.deferred] == [("s3", "w3")]

    out = fleet.release("s3", all=True)
    assert [d[:2] for d in out.deferred] == [("s2", "w2")]


def test_shared_waiters_are_granted_together(fleet: Fleet) -> None:
    """Waiters whose shared claims coexist are all granted by one release."""
    fleet.claim("s1", "a")
    fleet.claim("s2", "a", mode="shared", wait_s=30)
    fleet.claim("s3", "a", mode="shared", wait_s=30)

    out = fleet.release("s1", all=True)

    assert [d[0] for d in out.deferred] == ["s2", "s3"]


def test_later_waiter_does_not_overtake_an_earlier_one(fleet: Fleet) -> None:
    """A waiter blocked only by an earlier waiter stays queued behind it."""
    fleet.join("s4")
    fleet.claim("s1", "x")
    fleet.claim("s4", "y")
    fleet.claim("s2", "x", "y", wait_s=30, rid="w2")
    fleet.claim("s3", "x", wait_s=30, rid="w3")

    out = fleet.release("s1", all=True)
    assert out.deferred == []
    assert fleet.held() == ["y"]

    out = fleet.release("s4", all=True)
    assert [d[:2] for d in out.deferred] == [("s2", "w2")]
    assert fleet.table.is_waiting("s3", "w3")


def test_new_wait_queues_behind_a_conflicting_waiter(fleet: Fleet) -> None:
    """A wait for a free scope that an earlier waiter wants is queued, not granted."""
    fleet.claim("s1", "x")
    fleet.claim("s2", "x", "y", wait_s=30)

    out = fleet.claim("s3", "y", wait_s=30)

    assert out.queued == 2


def test_immediate_claim_only_checks_held_claims(fleet: Fleet) -> None:
    """A claim without wait is granted over a scope that is only waited for."""
    fleet.claim("s1", "x")
    fleet.claim("s2", "x", "y", wait_s=30)

    out = fleet.claim("s3", "y")

    assert out.reply is not None


def test_wait_times_out_at_its_deadline(fleet: Fleet) -> None:
    """A wait past its deadline ends with a timeout reply naming the holder."""
    fleet.claim("s1", "a")
    fleet.claim("s2", "a", wait_s=10, rid="w2")
    fleet.keepalive(at(8))

    assert fleet.tick(at(9.9)).events == []
    out = fleet.tick(at(10))

    assert kinds(out) == [("wait.ended", "timeout")]
    ((sid, rid, reply),) = out.deferred
    assert (sid, rid, reply["ok"]) == ("s2", "w2", False)
    assert reply["error"]["code"] == "timeout"
    assert reply["error"]["holders"][0]["sid"] == "s1"
    assert "held by alice (sid s1)" in reply["error"]["message"]
    assert fleet.release("s1", all=True, now=at(11)).deferred == []


def test_next_deadline_covers_leases_and_waits(fleet: Fleet) -> None:
    """The next deadline is the earliest lease end or wait deadline."""
    assert fleet.table.next_deadline() == T0.mono + 5
    fleet.claim("s1", "a")
    fleet.claim("s2", "a", wait_s=2, now=at(1))

    assert fleet.table.next_deadline() == T0.mono + 3


# -- deadlocks ---------------------------------------------------------------


def test_two_session_deadlock_is_refused_with_its_cycle(fleet: Fleet) -> None:
    """A waits for B's claim while B would wait for A's: refused at once."""
    fleet.claim("s1", "a")
    fleet.claim("s2", "b")
    fleet.claim("s1", "b", wait_s=30)
    before = fleet.table.view.snapshot()

    with pytest.raises(Deadlock) as info:
        fleet.claim("s2", "a", wait_s=30)

    assert info.value.details["cycle"] == ["s2", "s1"]
    assert "bob (sid s2) waits for alice (sid s1) waits for bob" in str(info.value)
    assert fleet.table.view.snapshot() == before


def test_three_session_deadlock_names_the_whole_cycle(fleet: Fleet) -> None:
    """A cycle through three sessions is found and named in wait order."""
    fleet.claim("s1", "a")
    fleet.claim("s2", "b")
    fleet.claim("s3", "c")
    fleet.claim("s1", "b", wait_s=30)
    fleet.claim("s2", "c", wait_s=30)

    with pytest.raises(Deadlock) as info:
        fleet.claim("s3", "a", wait_s=30)

    assert info.value.details["cycle"] == ["s3", "s1", "s2"]


def test_waiting_on_a_chain_without_cycle_is_queued(fleet: Fleet) -> None:
    """Waiting for a session that waits for a third one is no deadlock."""
    fleet.claim("s1", "a")
    fleet.claim("s2", "b")
    fleet.claim("s1", "b", wait_s=30)

    out = fleet.claim("s3", "a", wait_s=30)

    assert out.queued == 2


def test_deadlock_through_queue_order_is_refused(fleet: Fleet) -> None:
    """Waiting behind an earlier waiter that waits for us is a deadlock too."""
    fleet.claim("s1", "x")
    fleet.claim("s2", "y", "x", wait_s=30)

    with pytest.raises(Deadlock) as info:
        fleet.claim("s1", "y", wait_s=30)

    assert info.value.details["cycle"] == ["s1", "s2"]


# -- sessions and leases -----------------------------------------------------


def test_lost_lease_releases_lease_bound_claims_only(fleet: Fleet) -> None:
    """A silent session loses its lease-bound claims; TTL claims outlive it."""
    fleet.claim("s1", "lease-bound")
    fleet.claim("s1", "with-ttl", ttl_s=60)
    fleet.keepalive(at(5), "s2", "s3")

    assert fleet.tick(at(4.9)).events == []
    out = fleet.tick(at(5))

    assert kinds(out) == [
        ("claim.released", "session_lost"),
        ("session.lost", "lease_expired"),
    ]
    assert "s1" not in fleet.table.view.sessions
    assert fleet.held() == ["with-ttl"]

    fleet.keepalive(at(60))
    out = fleet.tick(at(60))
    assert kinds(out) == [("claim.released", "ttl_expired")]
    assert fleet.held() == []


def test_a_lost_session_is_named_with_every_scope_it_held(fleet: Fleet) -> None:
    """The outcome names a session lost holding claims: lease-bound, then TTL.

    A session lost holding nothing, and one that leaves, are not named.
    """
    fleet.claim("s1", "with-ttl", ttl_s=60)
    fleet.claim("s1", "lease-bound", "src/")
    fleet.record(fleet.table.leave("s2", at(1)))

    out = fleet.tick(at(5))

    assert [(info.sid, info.name, held) for info, held in out.lost] == [
        ("s1", "alice", ["lease-bound", "src/", "with-ttl"])
    ]
    assert ("session.lost", "lease_expired") in kinds(out)
    assert [e["sid"] for e in out.events if e["type"] == "session.lost"] == [
        "s1",
        "s3",
    ]


def test_touch_and_requests_renew_the_lease(fleet: Fleet) -> None:
    """An idle but alive session keeps its claims while it touches its lease."""
    fleet.claim("s1", "a")
    for second in range(1, 30):
        fleet.keepalive(at(second))
        assert fleet.tick(at(second + 0.5)).events == []

    assert fleet.held() == ["a"]


def test_lost_session_waits_are_cancelled(fleet: Fleet) -> None:
    """A session that loses its lease stops waiting; its waiter gets a reply."""
    fleet.claim("s1", "a", ttl_s=100)
    fleet.claim("s2", "a", wait_s=100, rid="w2")

    out = fleet.tick(at(6))

    assert ("wait.ended", "cancelled") in kinds(out)
    assert ("s2", "w2") in [d[:2] for d in out.deferred]
    assert fleet.table.view.waiters == []


def test_leave_releases_lease_bound_claims_at_once(fleet: Fleet) -> None:
    """A clean leave releases lease-bound claims (session_left) and keeps TTLs."""
    fleet.claim("s1", "a")
    fleet.claim("s1", "b", ttl_s=60)
    fleet.claim("s2", "a", wait_s=30, rid="w2")

    out = fleet.record(fleet.table.leave("s1", at(1)))

    assert kinds(out)[:2] == [
        ("claim.released", "session_left"),
        ("session.left", None),
    ]
    assert [d[:2] for d in out.deferred] == [("s2", "w2")]
    assert fleet.held("s1") == ["b"]
    assert "s1" not in fleet.table.view.sessions


def test_unleased_session_is_dropped_once_it_holds_nothing(fleet: Fleet) -> None:
    """An attached session lives while it holds claims, then leaves by itself."""
    fleet.join("cli", leased=False)
    fleet.claim("cli", "a", ttl_s=60)
    fleet.claim("cli", "b", ttl_s=120)

    assert kinds(fleet.release("cli", scopes=["a"])) == [("claim.released", "released")]
    fleet.keepalive(at(120), "s1", "s2", "s3")
    out = fleet.tick(at(120))

    assert kinds(out) == [("claim.released", "ttl_expired"), ("session.left", None)]
    assert "cli" not in fleet.table.view.sessions


def test_unleased_session_must_give_claims_a_ttl(fleet: Fleet) -> None:
    """A claim without TTL from a session without lease is bad input."""
    fleet.join("cli", leased=False)

    with pytest.raises(BadInput):
        fleet.claim("cli", "a")


def test_unleased_idle_session_is_dropped_after_its_lease_period(
    fleet: Fleet,
) -> None:
    """An attached session that never claims is dropped after one lease period."""
    fleet.join("cli", leased=False, lease_s=2)

    out = fleet.table.tick(Now(T0.wall + 2, T0.mono + 2))

    assert kinds(out) == [("session.left", None)]


def test_joining_again_resumes_a_live_session(fleet: Fleet) -> None:
    """A known live sid joining again is resumed without any event."""
    out = fleet.join("s1", now=at(3))

    assert out.events == []
    assert out.reply is not None
    assert out.reply["resumed"] is True
    assert fleet.table.next_deadline() == T0.mono + 5


def test_unknown_session_is_refused_everywhere(fleet: Fleet) -> None:
    """Every per-session call from an unknown sid raises UnknownSession."""
    table = fleet.table
    seq = table.sequence.seq
    calls = [
        lambda: table.touch("nobody", T0),
        lambda: fleet.claim("nobody", "a"),
        lambda: table.release("nobody", all=True, now=T0),
        lambda: table.renew("nobody", ids=["x"], ttl_s=1, now=T0),
        lambda: table.leave("nobody", T0),
    ]
    for call in calls:
        with pytest.raises(UnknownSession):
            call()
    assert table.sequence.seq == seq


def test_restore_gives_sessions_a_fresh_lease_and_grace(fleet: Fleet) -> None:
    """After a restart sessions and claims come back with lease plus grace."""
    fleet.claim("s1", "a", ttl_s=100)
    view = fleet.table.view
    table = ClaimTable(REPO, Sequence(fleet.table.sequence.seq))

    # A new process: wall time moved on, the monotonic clock started afresh.
    restart = Now(wall=T0.wall + 10, mono=1.0)
    table.restore(list(view.sessions.values()), view.claims(), grace_s=5, now=restart)

    assert table.view.claims() == view.claims()
    assert table.next_deadline() == 11.0
    assert table.next_ttl() == T0.wall + 100
    assert table.tick(Now(T0.wall + 19, 10.9)).events == []
    lost = table.tick(Now(T0.wall + 20, 11.0)).events
    assert [e["type"] for e in lost] == ["session.lost"] * 3


@pytest.mark.parametrize("warm", [False, True])
def test_a_restored_table_judges_patterns_against_held_paths(
    fleet: Fleet, warm: bool
) -> None:
    """Restored claims meet a directory or glob claim whether or not the
    index was warmed before the first pattern query."""
    fleet.claim("s1", "src/a.py", "lib/deep/b.py", ttl_s=100)
    view = fleet.table.view
    table = ClaimTable(REPO, Sequence(fleet.table.sequence.seq))
    restart = Now(wall=T0.wall + 1, mono=1.0)
    table.restore(list(view.sessions.values()), view.claims(), grace_s=5, now=restart)
    if warm:
        table.view.warm()

    for scopes in (["src/"], ["lib/**/*.py"]):
        with pytest.raises(Conflict):
            table.claim(
                "s2",
                [parse_scope(text) for text in scopes],
                mode="exclusive",
                intent="",
                ttl_s=None,
                wait_s=None,
                rid=f"r-{scopes[0]}",
                now=restart,
            )
    out = table.claim(
        "s2",
        [parse_scope("docs/")],
        mode="exclusive",
        intent="",
        ttl_s=None,
        wait_s=None,
        rid="r-docs",
        now=restart,
    )
    assert out.reply is not None
    table.view.warm()
    assert sorted(c.scope.text for c in table.view.claims()) == [
        "docs/",
        "lib/deep/b.py",
        "src/a.py",
    ]


# -- release, renew, force ---------------------------------------------------


def test_release_by_scope_takes_the_covered_rows(fleet: Fleet) -> None:
    """Releasing a directory releases the session's rows beneath it only."""
    fleet.claim("s1", "src/a.py", "src/b/c.py", "lib/x.py")
    fleet.claim("s2", "src/z.py")

    out = fleet.release("s1", scopes=["src/"])

    assert out.reply is not None
    assert len(out.reply["released"]) == 2
    assert fleet.held() == ["lib/x.py", "src/z.py"]


def test_release_by_grant_ids_and_all(fleet: Fleet) -> None:
    """Each selector releases exactly the rows it names."""
    first = fleet.claim("s1", "a", "b")
    fleet.claim("s1", "c", "d")
    assert first.reply is not None

    fleet.release("s1", grant=first.reply["grant"])
    assert fleet.held() == ["c", "d"]

    fleet.release("s1", ids=[fleet.table.view.claims()[0].id, "gone"])
    assert fleet.held() == ["d"]

    fleet.release("s1", all=True)
    assert fleet.held() == []


def test_release_needs_exactly_one_selector(fleet: Fleet) -> None:
    """No selector, or two, is bad input."""
    with pytest.raises(BadInput):
        fleet.release("s1")
    with pytest.raises(BadInput):
        fleet.release("s1", all=True, grant="g")


def test_only_the_owner_may_release_or_renew(fleet: Fleet) -> None:
    """Naming another session's row raises NotOwner and changes nothing."""
    out = fleet.claim("s1", "a")
    assert out.reply is not None
    grant, cid = out.reply["grant"], out.reply["claims"][0]["id"]
    before = fleet.table.view.snapshot()

    with pytest.raises(NotOwner):
        fleet.release("s2", ids=[cid])
    with pytest.raises(NotOwner):
        fleet.release("s2", grant=grant)
    with pytest.raises(NotOwner):
        fleet.table.renew("s2", grant=grant, ttl_s=10, now=T0)

    assert fleet.table.view.snapshot() == before


@pytest.mark.parametrize("text", ["a/", "a/b/", "a/b/c.py", "a/b/*.py", "**"])
def test_releasing_only_another_sessions_scope_is_not_owner(
    fleet: Fleet, text: str
) -> None:
    """A scope that names, covers or lies within another's claim is NotOwner."""
    fleet.claim("s1", "a/b/")
    before = fleet.table.view.snapshot()

    with pytest.raises(NotOwner) as refused:
        fleet.release("s2", scopes=[text])

    assert [h["sid"] for h in refused.value.details["holders"]] == ["s1"]
    assert fleet.table.view.snapshot() == before


def test_releasing_part_of_an_own_claim_is_bad_input(fleet: Fleet) -> None:
    """A claim is released whole: a path inside it says which scope to name."""
    fleet.claim("s1", "a/")

    with pytest.raises(BadInput, match=r"release a/$"):
        fleet.release("s1", scopes=["a/b.py"])

    assert fleet.held() == ["a/"]


def test_releasing_an_unheld_scope_releases_nothing(fleet: Fleet) -> None:
    """A scope nobody holds, or only overlaps without covering, is a no-op."""
    fleet.claim("s1", "a/*.py")

    assert fleet.release("s2", scopes=["b/"]).events == []
    assert fleet.release("s2", scopes=["a/b*"]).events == []
    assert fleet.held() == ["a/*.py"]


def test_renew_sets_a_new_ttl(fleet: Fleet) -> None:
    """Renew moves the expiry of the owner's rows and announces it."""
    out = fleet.claim("s1", "a", ttl_s=10)
    assert out.reply is not None

    renewed = fleet.record(
        fleet.table.renew("s1", grant=out.reply["grant"], ttl_s=100, now=at(5))
    )

    assert kinds(renewed) == [("claim.renewed", None)]
    assert renewed.events[0]["expires"] == at(105).wall
    assert fleet.table.next_ttl() == at(105).wall
    fleet.keepalive(at(50))
    assert fleet.tick(at(50)).events == []
    assert fleet.held("s1") == ["a"]


def test_renew_of_nothing_held_is_bad_input(fleet: Fleet) -> None:
    """Renewing an unknown grant or id is refused as bad input."""
    fleet.claim("s1", "a")

    with pytest.raises(BadInput):
        fleet.table.renew("s1", grant="nope", ttl_s=10, now=T0)
    with pytest.raises(BadInput):
        fleet.table.renew("s1", ids=["nope"], ttl_s=10, now=T0)


def test_force_release_frees_any_session_and_grants_waiters(fleet: Fleet) -> None:
    """An operator's force release takes anyone's rows, reason forced."""
    fleet.claim("s1", "src/a.py")
    fleet.claim("s2", "src/b.py")
    fleet.claim("s3", "src/a.py", wait_s=30)

    out = fleet.record(
        fleet.table.force_release(scopes=scopes("src/"), by="ops", now=T0)
    )

    released = [e for e in out.events if e["type"] == "claim.released"]
    assert [(e["sid"], e["reason"], e["by"]) for e in released] == [
        ("s1", "forced", "ops"),
        ("s2", "forced", "ops"),
    ]
    assert fleet.held() == ["src/a.py"]
    assert fleet.held("s3") == ["src/a.py"]


# -- limits ------------------------------------------------------------------


@pytest.fixture
def small() -> Fleet:
    limits = Limits(
        scopes_per_claim=2, claims_per_session=3, sessions_per_repo=2, intent_len=5
    )
    fleet = Fleet(ClaimTable(REPO, Sequence(), limits))
    fleet.join("s1")
    return fleet


@pytest.mark.parametrize(
    ("limit", "call"),
    [
        ("scopes_per_claim", lambda f: f.claim("s1", "x", "y", "z")),
        ("intent_len", lambda f: f.claim("s1", "x", intent="x" * 6)),
        ("claims_per_session", lambda f: f.claim("s1", "x", "y")),
        ("sessions_per_repo", lambda f: f.join("s3")),
    ],
)
def test_limits_refuse_and_change_nothing(small: Fleet, limit: str, call: Any) -> None:
    """Each limit raises LimitExceeded naming it, and the table is unchanged."""
    small.join("s2")
    small.claim("s1", "a", "b")
    before = small.table.view.snapshot()

    with pytest.raises(LimitExceeded) as info:
        call(small)

    assert info.value.details["limit"] == limit
    assert small.table.view.snapshot() == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "greedy"},
        {"ttl_s": 0},
        {"ttl_s": float("inf")},
        {"wait_s": -1},
    ],
)
def test_bad_claim_arguments_are_bad_input(fleet: Fleet, kwargs: Any) -> None:
    """A malformed claim is refused before anything changes."""
    with pytest.raises(BadInput):
        fleet.claim("s1", "a", **kwargs)
    assert fleet.held() == []


def test_claim_without_scopes_is_bad_input(fleet: Fleet) -> None:
    """A claim must name at least one scope."""
    with pytest.raises(BadInput):
        fleet.claim("s1")


# -- the replica -------------------------------------------------------------


def test_replica_fed_the_events_equals_the_table(fleet: Fleet) -> None:
    """A view built from the emitted events, or from a snapshot, matches."""
    fleet.join("cli", leased=False)
    fleet.claim("s1", "src/", "@db", intent="big change")
    fleet.claim("s2", "lib/*.py", mode="shared", ttl_s=30)
    fleet.claim("s3", "src/a.py", wait_s=60)
    fleet.claim("cli", "lib/a.py", mode="shared", ttl_s=10)
    grant = fleet.table.view.claims("s2")[0].grant
    fleet.record(fleet.table.renew("s2", grant=grant, ttl_s=5, now=T0))
    fleet.release("s1", scopes=["@db"])
    fleet.tick(at(6))

    expected = fleet.table.view.snapshot()
    assert fleet.replica().snapshot() == expected
    loaded = ClaimView()
    loaded.load(expected)
    assert loaded.snapshot() == expected


def test_replica_ignores_unknown_events() -> None:
    """Heartbeats and future event types leave a view unchanged."""
    view = ClaimView()
    view.apply({"type": "heartbeat", "epoch": 1, "head": 0})
    view.apply({"type": "claim.transferred", "seq": 1, "prev": 0})

    assert view.snapshot()["claims"] == []


def test_may_edit_and_holders(fleet: Fleet) -> None:
    """A path is editable unless another session holds a matching scope."""
    fleet.claim("s1", "src/")
    fleet.claim("s2", "docs/*.md", mode="shared")
    view = fleet.replica()

    assert view.may_edit("src/a.py", "s1")
    assert not view.may_edit("src/a.py", "s2")
    assert not view.may_edit("docs/x.md", "s1")
    assert view.may_edit("README.md", "s3")
    assert [row.sid for row in view.holders("src/b/c.py")] == ["s1"]


def test_may_edit_is_exact_with_many_rows() -> None:
    """may_edit stays exact with 10,000 rows held (its speed is a benchmark)."""
    fleet = Fleet(ClaimTable(REPO, Sequence(), Limits(claims_per_session=10_000)))
    fleet.join("s1")
    for n in range(100):
        fleet.claim("s1", *(f"pkg{n}/mod{m}.py" for m in range(50)))
        fleet.claim("s1", *(f"pkg{n}/sub/file{m}.py" for m in range(50)))
    view = fleet.table.view
    assert len(view) == 10_000

    assert not view.may_edit("pkg7/mod3.py", "s2")
    assert not view.may_edit("pkg99/sub/file49.py", "s2")
    assert view.may_edit("pkg7/mod50.py", "s2")
    assert view.may_edit("pkg7/mod3.py", "s1")


def test_force_release_by_ids_drops_an_emptied_attached_session(
    fleet: Fleet,
) -> None:
    """Forcing out an attached session's last claim also ends that session."""
    fleet.join("cli", leased=False)
    out = fleet.claim("cli", "a", ttl_s=60)
    assert out.reply is not None

    forced = fleet.record(
        fleet.table.force_release(ids=[out.reply["claims"][0]["id"]], by="ops", now=T0)
    )

    assert kinds(forced) == [("claim.released", "forced"), ("session.left", None)]


def test_cancelled_wait_is_answered_with_a_refusal(fleet: Fleet) -> None:
    """A wait ended by its own session's leave gets a refused reply, not silence."""
    fleet.claim("s1", "a")
    fleet.claim("s2", "a", wait_s=30, rid="w2")

    out = fleet.record(fleet.table.leave("s2", T0))

    ((sid, rid, reply),) = out.deferred
    assert (sid, rid) == ("s2", "w2")
    assert reply["error"]["code"] == "refused"
    assert "session left" in reply["error"]["message"]


def test_next_ttl_skips_released_and_renewed_rows(fleet: Fleet) -> None:
    """The next TTL is that of a row still held, at its latest expiry."""
    first = fleet.claim("s1", "a", ttl_s=10)
    fleet.claim("s1", "b", ttl_s=20)
    assert first.reply is not None

    fleet.release("s1", grant=first.reply["grant"])
    assert fleet.table.next_ttl() == at(20).wall

    fleet.table.renew("s1", ids=[fleet.table.view.claims()[0].id], ttl_s=50, now=T0)
    assert fleet.table.next_ttl() == at(50).wall


def test_cancel_withdraws_a_wait_and_lets_the_next_one_through(fleet: Fleet) -> None:
    """A cancelled wait is refused, and a later wait it held back is granted."""
    fleet.claim("s1", "a", "b")
    fleet.claim("s2", "a", "b", wait_s=30, rid="w2")
    fleet.claim("s3", "b", wait_s=30, rid="w3")
    fleet.release("s1", scopes=["a"])

    out = fleet.record(fleet.table.cancel("s2", "w2", now=T0))
    granted = fleet.release("s1", scopes=["b"])

    assert out.reply == {"cancelled": True}
    assert [(sid, rid, reply["ok"]) for sid, rid, reply in out.deferred] == [
        ("s2", "w2", False)
    ]
    assert [(sid, rid) for sid, rid, _reply in granted.deferred] == [("s3", "w3")]
    assert fleet.held() == ["b"]
    assert fleet.table.cancel("s2", "w2", now=T0).reply == {"cancelled": False}


# -- the compact snapshot ------------------------------------------------------


def test_compact_snapshot_groups_rows_that_share_all_but_id_and_scope(
    fleet: Fleet,
) -> None:
    """One group per run of rows of a grant; a partial renewal splits the run."""
    first = fleet.claim("s1", "a.py", "b.py", "c.py", ttl_s=30)
    fleet.claim("s2", "src/", "@db")
    assert first.reply is not None
    renewed = first.reply["claims"][1]["id"]
    fleet.table.renew("s1", ids=[renewed], ttl_s=60, now=T0)

    groups = fleet.table.snapshot(compact=True)["claim_groups"]

    assert [(g[0], g[-1]) for g in groups] == [
        ("s1", ["a.py"]),
        ("s1", ["b.py"]),
        ("s1", ["c.py"]),
        ("s2", ["src/", "@db"]),
    ]
    assert groups[1][7] == at(60).wall
    loaded = ClaimView()
    loaded.load(fleet.table.snapshot(compact=True))
    assert loaded.snapshot() == fleet.table.view.snapshot()


def test_compact_snapshot_is_reused_until_the_claims_change(fleet: Fleet) -> None:
    """The groups list is the same object while the head stands, a new one after."""
    fleet.claim("s1", "a.py")
    before = fleet.table.snapshot(compact=True)["claim_groups"]
    fleet.table.touch("s2", at(1))

    same = fleet.table.snapshot(compact=True)["claim_groups"]
    fleet.claim("s2", "b.py")
    after = fleet.table.snapshot(compact=True)["claim_groups"]

    assert same is before
    assert after is not before
    assert [g[-1] for g in after] == [["a.py"], ["b.py"]]


@pytest.mark.parametrize(
    "groups",
    [
        ["not a group"],
        [["s1", "n", "exclusive", "", "g", 1, 0.0, None, ["c1"]]],
        [["s1", "n", "exclusive", "", "g", 1, 0.0, None, ["c1"], ["a", "b"]]],
        [["s1", "n", "exclusive", "", "g", 1, 0.0, None, [1], ["a"]]],
        [["s1", "n", "exclusive", "", "g", 1, 0.0, None, [], []]],
        [["s1", "n", "sole", "", "g", 1, 0.0, None, ["c1"], ["a"]]],
        [["s1", "n", "exclusive", "", "g", "x", 0.0, None, ["c1"], ["a"]]],
        [["s1", "n", "exclusive", "", "g", 1, 0.0, None, ["c1"], ["../a"]]],
        [["s1", "n", "exclusive", "", "g", 1, 0.0, None, ["c1"], [7]]],
        [["s1", "n", "exclusive", "", "g", 1, 0.0, None, ["c1", "c1"], ["a", "b"]]],
    ],
)
def test_a_malformed_compact_snapshot_is_a_protocol_error(groups: Any) -> None:
    """Every broken group is refused as ProtocolError, leaving the view empty."""
    view = ClaimView()
    good = ["s0", "n", "exclusive", "", "g0", 1, 0.0, None, ["c0"], ["z.py"]]

    with pytest.raises(ProtocolError):
        view.load({"head": 1, "claim_groups": [good, *groups]})

    assert len(view) == 0
    assert view.may_edit("z.py", "s1")


def test_a_loaded_snapshot_canonicalises_scopes_it_parses() -> None:
    """Literal texts take the fast path; others are parsed as ever."""
    group = ["s1", "n", "exclusive", "", "g", 1, 0.0, None]
    view = ClaimView()
    view.load(
        {
            "head": 2,
            "claim_groups": [[*group, ["c1", "c2", "c3"], ["src/a.py", "./b", "d/**"]]],
        }
    )

    assert [row.scope.text for row in view.claims()] == ["src/a.py", "b", "d/"]
    assert [row.id for row in view.holders("d/x")] == ["c3"]
    assert not view.may_edit("b", "s2")
    assert view.may_edit("b", "s1")


def test_claim_groups_that_are_not_a_list_are_a_protocol_error() -> None:
    """A snapshot whose claim_groups is an object or a string is refused."""
    for groups in ({"g": []}, "groups"):
        with pytest.raises(ProtocolError):
            ClaimView().load({"head": 1, "claim_groups": groups})
