"""Steps shared by the fault tests: let a fleet settle, then run every checker."""

from __future__ import annotations

from typing import Any

from tests.faults import checkers
from tests.faults.harness import Fleet, wait_for
from tests.faults.history import Op, summary

LATE_SCOPES = ["src/", "@build"]


def settle(fleet: Fleet, timeout: float = 60.0) -> dict[str, Any]:
    """Wait for the workers to finish, then for their replicas to converge."""
    fleet.wait_done(timeout=timeout)
    (fleet.runs / "quiet").touch()

    def converged() -> tuple[dict[str, Any], dict[str, Any]] | None:
        snap = fleet.snapshot()
        replicas = fleet.replicas()
        live = [sid for sid, proc in fleet.workers.items() if proc.poll() is None]
        if not all(sid in replicas for sid in live):
            return None
        if any(replicas[sid]["head"] != snap["head"] for sid in live):
            return None
        again = fleet.snapshot()
        if again["head"] != snap["head"]:
            return None
        return snap, {sid: replicas[sid] for sid in live}

    snap, replicas = wait_for(converged, timeout, "replicas to converge", step=0.1)
    checkers.check_converged(snap, replicas)
    observer = fleet.observer
    assert observer is not None
    wait_for(
        lambda: observer.applied >= snap["head"], timeout, "the observer to catch up"
    )
    return snap


def check_all(fleet: Fleet, *, gaps_allowed: bool = False) -> dict[str, Any]:
    """Run every checker over what the fleet recorded; returns the figures."""
    assert fleet.observer is not None
    ops = fleet.history()
    with fleet.observer.lock:
        seen = fleet.observer.seen
        stream = checkers.check_claims_stream(
            seen, fleet.restarts, gaps_allowed=gaps_allowed
        )
        fact_events = checkers.check_fact_streams(seen, fleet.restarts)
    grants = checkers.check_fences(ops)
    late = late_joiner(fleet, ops)
    counts = summary(ops)
    assert counts.get("ok", 0) > 0, counts
    return {
        "ops": len(ops),
        **counts,
        "events": stream.events,
        "gaps": stream.gaps,
        "fact_events": fact_events,
        "grants": grants,
        "late_facts": late,
    }


def late_joiner(fleet: Fleet, ops: list[Op]) -> int:
    """A fresh reader's query returns exactly the retained facts on its scopes."""
    assert fleet.raw is not None
    reply = fleet.raw.request(
        "facts", repo="fault-repo", scopes=LATE_SCOPES, limit=10_000
    )
    assert reply["ok"], reply
    assert not reply["more"]
    return checkers.check_late_joiner(ops, LATE_SCOPES, reply["facts"])
