"""The claim table driven by random operations, checked after every step."""

from __future__ import annotations

import math
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fleetbus.claims import ClaimTable, ClaimView, Limits, Mode, Now, Outcome
from fleetbus.errors import Deadlock, FleetbusError
from fleetbus.scope import Scope, parse_scope
from fleetbus.sequence import Sequence

SIDS = ["s1", "s2", "s3", "s4"]
SCOPES = [
    parse_scope(text)
    for text in ("a", "a/", "a/b.py", "a/*.py", "b/**", "b/c", "*", "@db", "@ci")
]
MODES: list[Mode] = ["exclusive", "shared"]
PATHS = ["a", "a/b.py", "a/c.py", "a/b.py/x", "b", "b/c", "b/d/e", "c", "@db", "@ci"]

sids = st.sampled_from(SIDS)
scope_lists = st.lists(st.sampled_from(SCOPES), min_size=1, max_size=3)
modes = st.sampled_from(MODES)


def conflicting(a: Scope, a_mode: str, b: Scope, b_mode: str) -> bool:
    exclusive = "exclusive" in (a_mode, b_mode)
    return exclusive and a.overlaps(b)


def wait_for(
    view: ClaimView, sid: str, scopes: list[Scope], mode: str
) -> tuple[dict[str, set[str]], set[str]]:
    """The whole wait-for graph, and whom a new wait of ``sid`` would wait for.

    Each session waits for the holders of what its waits conflict with and for
    the conflicting waits of others queued before them.
    """
    waiters = view.waiters

    def targets(who: str, wanted: tuple[Scope, ...], how: str, before: int) -> set[str]:
        found = {
            row.sid
            for row in view.claims()
            for scope in wanted
            if row.sid != who and conflicting(row.scope, row.mode, scope, how)
        }
        found.update(
            w.sid
            for w in waiters[:before]
            if w.sid != who
            and any(conflicting(a, w.mode, b, how) for a in w.scopes for b in wanted)
        )
        return found

    graph: dict[str, set[str]] = {}
    for n, w in enumerate(waiters):
        graph.setdefault(w.sid, set()).update(targets(w.sid, w.scopes, w.mode, n))
    return graph, targets(sid, tuple(scopes), mode, len(waiters))


def reaches(graph: dict[str, set[str]], start: set[str], goal: str) -> bool:
    """Whether ``goal`` is reachable in ``graph`` from ``start``."""
    seen, stack = set(start), list(start)
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


class ClaimTableMachine(RuleBasedStateMachine):
    """Random joins, claims, waits, releases, renewals, leaves and ticks."""

    def __init__(self) -> None:
        super().__init__()
        limits = Limits(claims_per_session=12, sessions_per_repo=3)
        self.table = ClaimTable("git:model", Sequence(), limits)
        self.now = Now(wall=1_700_000_000.0, mono=50.0)
        self.events: list[dict[str, Any]] = []
        self.fences: list[int] = []
        self.queued: set[tuple[str, str]] = set()
        self.answered: set[tuple[str, str]] = set()
        self.rids = 0

    # -- driving ------------------------------------------------------------

    def attempt(self, call: Any) -> Outcome | None:
        """Run a table call; a refused one must have changed nothing."""
        before = self.table.view.snapshot()
        seq = self.table.sequence.seq
        try:
            outcome: Outcome = call()
        except FleetbusError:
            assert self.table.view.snapshot() == before
            assert self.table.sequence.seq == seq
            return None
        self.take(outcome)
        return outcome

    def take(self, outcome: Outcome) -> None:
        self.events.extend(outcome.events)
        for event in outcome.events:
            if event["type"] == "claim.granted":
                self.fences.append(event["fence"])
                assert event["fence"] == event["seq"]
        for sid, rid, _ in outcome.deferred:
            assert (sid, rid) in self.queued
            assert (sid, rid) not in self.answered
            self.answered.add((sid, rid))

    def known(self, sid: str) -> bool:
        return sid in self.table.view.sessions

    @initialize()
    def start_sessions(self) -> None:
        for sid in SIDS[:3]:
            self.join(sid, leased=True, lease_s=5.0)

    @rule(sid=sids, leased=st.booleans(), lease_s=st.sampled_from([2.0, 5.0]))
    def join(self, sid: str, leased: bool, lease_s: float) -> None:
        self.attempt(
            lambda: self.table.join(
                sid, sid.upper(), {}, leased=leased, lease_s=lease_s, now=self.now
            )
        )

    def live(self, data: st.DataObject) -> str:
        """A session that is known, most of the time, else any sid."""
        known = sorted(self.table.view.sessions)
        return data.draw(st.sampled_from(known) if known else sids)

    @rule(
        data=st.data(),
        scopes=scope_lists,
        mode=modes,
        ttl_s=st.sampled_from([None, 3.0, 20.0]),
        wait_s=st.sampled_from([None, 0.0, 2.0, 8.0, 8.0]),
    )
    def claim(
        self,
        data: st.DataObject,
        scopes: list[Scope],
        mode: Mode,
        ttl_s: float | None,
        wait_s: float | None,
    ) -> None:
        sid = self.live(data)
        self.rids += 1
        rid = f"r{self.rids}"
        graph, start = wait_for(self.table.view, sid, scopes, mode)
        cycle = bool(wait_s) and reaches(graph, start, sid)
        refused: list[Deadlock] = []

        def call() -> Outcome:
            try:
                return self.table.claim(
                    sid,
                    scopes,
                    mode=mode,
                    intent="model",
                    ttl_s=ttl_s,
                    wait_s=wait_s,
                    rid=rid,
                    now=self.now,
                )
            except Deadlock as exc:
                refused.append(exc)
                raise

        outcome = self.attempt(call)
        if refused:
            assert cycle, refused[0]
            chain = refused[0].details["cycle"]
            assert chain[0] == sid
            assert len(set(chain)) == len(chain)
            assert chain[1] in start
            for waiter, waited in zip(chain[1:], [*chain[2:], sid], strict=True):
                assert waited in graph[waiter], (chain, graph)
        elif outcome is not None:
            assert not cycle
        if outcome is not None and outcome.queued is not None:
            self.queued.add((sid, rid))
            assert self.table.is_waiting(sid, rid)

    @precondition(lambda self: self.table.view.claims())
    @rule(data=st.data(), how=st.sampled_from(["grant", "ids", "all"]))
    def release(self, data: st.DataObject, how: str) -> None:
        row = data.draw(st.sampled_from(self.table.view.claims()))
        sid = data.draw(st.sampled_from([row.sid, self.live(data)]))
        selector: dict[str, Any] = {
            "grant": {"grant": row.grant},
            "ids": {"ids": [row.id]},
            "all": {"all": True},
        }[how]
        self.attempt(lambda: self.table.release(sid, now=self.now, **selector))

    @rule(data=st.data(), scopes=scope_lists)
    def release_scopes(self, data: st.DataObject, scopes: list[Scope]) -> None:
        sid = self.live(data)
        self.attempt(lambda: self.table.release(sid, scopes=scopes, now=self.now))

    @rule(scopes=scope_lists)
    def force_release(self, scopes: list[Scope]) -> None:
        self.attempt(
            lambda: self.table.force_release(scopes=scopes, by="ops", now=self.now)
        )

    @precondition(lambda self: self.table.view.claims())
    @rule(data=st.data(), ttl_s=st.sampled_from([1.0, 10.0]))
    def renew(self, data: st.DataObject, ttl_s: float) -> None:
        row = data.draw(st.sampled_from(self.table.view.claims()))
        sid = data.draw(st.sampled_from([row.sid, self.live(data)]))
        self.attempt(
            lambda: self.table.renew(sid, grant=row.grant, ttl_s=ttl_s, now=self.now)
        )

    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        sid = self.live(data)
        self.attempt(lambda: self.table.leave(sid, self.now))

    @rule(sid=sids)
    def touch(self, sid: str) -> None:
        if self.known(sid):
            self.table.touch(sid, self.now)

    @rule()
    def heartbeat_all(self) -> None:
        for sid in list(self.table.view.sessions):
            self.table.touch(sid, self.now)

    @rule(seconds=st.sampled_from([0.5, 0.5, 1.0, 1.0, 2.5, 6.0]))
    def advance(self, seconds: float) -> None:
        self.now = Now(self.now.wall + seconds, self.now.mono + seconds)
        self.take(self.table.tick(self.now))
        lapsed = [d for d in self.lease_deadlines() if d <= self.now.mono]
        assert not lapsed, "tick left a session past its lease"

    def lease_deadlines(self) -> list[float]:
        """The deadlines tick acts on, by a look at every session."""
        table = self.table
        return [
            table._deadlines[sid]
            for sid, info in table.view.sessions.items()
            if info.leased or table._is_idle(sid)
        ]

    # -- invariants ---------------------------------------------------------

    @invariant()
    def no_conflicting_rows_of_different_sessions(self) -> None:
        rows = self.table.view.claims()
        for n, a in enumerate(rows):
            for b in rows[n + 1 :]:
                if a.sid != b.sid:
                    assert not conflicting(a.scope, a.mode, b.scope, b.mode), (a, b)

    @invariant()
    def replica_and_snapshot_match_the_table(self) -> None:
        expected = self.table.view.snapshot()
        replica = ClaimView()
        for event in self.events:
            replica.apply(event)
        assert replica.snapshot() == expected
        loaded = ClaimView()
        loaded.load(expected)
        assert loaded.snapshot() == expected

    @invariant()
    def compact_snapshot_loads_to_the_same_view(self) -> None:
        expected = self.table.snapshot()
        compact = orjson.loads(orjson.dumps(self.table.snapshot(compact=True)))
        assert "claims" not in compact
        loaded = ClaimView()
        loaded.load(compact)
        assert loaded.snapshot() == expected
        assert loaded.snapshot(compact=True)["claim_groups"] == compact["claim_groups"]

    @invariant()
    def may_edit_and_holders_equal_a_scan(self) -> None:
        view = self.table.view
        rows = view.claims()
        for path in PATHS:
            holders = [row for row in rows if row.scope.matches(path)]
            assert sorted(row.id for row in view.holders(path)) == sorted(
                row.id for row in holders
            )
            for sid in SIDS:
                free = all(row.sid == sid for row in holders)
                assert view.may_edit(path, sid) == free, (path, sid)

    @invariant()
    def the_next_deadline_is_the_earliest_of_every_session_and_wait(self) -> None:
        waits = [w.deadline for w in self.table.view.waiters if w.deadline < math.inf]
        expected = min(self.lease_deadlines() + waits, default=None)
        assert self.table.next_deadline() == expected

    @invariant()
    def events_are_chained_and_fences_increase(self) -> None:
        assert self.fences == sorted(set(self.fences))
        for before, after in zip(self.events, self.events[1:], strict=False):
            assert after["prev"] == before["seq"]
            assert after["seq"] > before["seq"]

    @invariant()
    def every_waiter_is_blocked_by_a_holder_or_an_earlier_waiter(self) -> None:
        view = self.table.view
        rows = view.claims()
        for n, waiter in enumerate(view.waiters):
            held = any(
                row.sid != waiter.sid
                and conflicting(row.scope, row.mode, scope, waiter.mode)
                for row in rows
                for scope in waiter.scopes
            )
            queued = any(
                earlier.sid != waiter.sid
                and conflicting(a, earlier.mode, b, waiter.mode)
                for earlier in view.waiters[:n]
                for a in earlier.scopes
                for b in waiter.scopes
            )
            assert held or queued, waiter

    @invariant()
    def waiters_and_lease_bound_rows_belong_to_live_sessions(self) -> None:
        view = self.table.view
        for waiter in view.waiters:
            assert waiter.sid in view.sessions
            assert (waiter.sid, waiter.rid) in self.queued
        for row in view.claims():
            assert row.expires is not None or row.sid in view.sessions

    @invariant()
    def ended_waits_are_answered(self) -> None:
        waiting = {(w.sid, w.rid) for w in self.table.view.waiters}
        assert self.queued - waiting == self.answered


ClaimTableMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestClaimTable = ClaimTableMachine.TestCase
