"""Faults of sessions: killed, stopped past their lease, cut off, reading slowly."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults import scenario
from tests.faults.harness import Fleet, Raw, wait_for
from tests.faults.proxy import PartitionProxy
from tests.faults.worker import REPO

# A resource no random claim of the workers overlaps, so the holder gets it.
HELD = "@held"
LEASE_MS = 1000
# The broker wakes for a lease deadline to the millisecond; what remains is
# scheduling noise on a loaded machine.
SLACK_S = 0.5


def held_grant(fleet: Fleet, sid: str) -> dict[str, Any]:
    """The acknowledged grant of ``HELD`` by worker ``sid``."""

    def find() -> dict[str, Any] | None:
        for op in fleet.history():
            mine = op.process == sid and op.op == "claim" and op.ok
            if mine and op.args["scopes"] == [HELD]:
                return op.value
        return None

    grant: dict[str, Any] = wait_for(find, 20, f"{sid} to hold {HELD}")
    return grant


def released_at(fleet: Fleet, ids: list[str]) -> tuple[float, str] | None:
    """When and why the observer saw the claims ``ids`` released."""
    assert fleet.observer is not None
    with fleet.observer.lock:
        for when, _topic, event in fleet.observer.seen.events:
            if event.get("type") == "claim.released" and set(ids) & set(event["ids"]):
                return when, event["reason"]
    return None


def queue_waiter(fleet: Fleet, sid: str = "waiter") -> Raw:
    """A raw session queued for ``HELD``; its final reply is still to come."""
    raw = Raw(fleet.broker.url)
    assert raw.request("hello", repo=REPO, sid=sid, name=sid)["ok"]
    raw.sock.send_json(
        {"op": "claim", "rid": "wait-1", "sid": sid, "scopes": [HELD], "wait_ms": 30000}
    )
    first = raw.recv(5)
    assert first is not None
    assert first.get("queued"), first
    return raw


def heartbeat_until(raw: Raw, sid: str, done: Callable[[], Any]) -> Any:
    """Keep a raw session's lease alive until ``done()`` returns something."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        value = done()
        if value:
            return value
        raw.sock.send_json({"op": "heartbeat", "rid": "hb", "sid": sid})
        reply = raw.recv(0.2)
        if reply is not None and reply.get("rid") == "wait-1":
            return reply
    raise AssertionError("nothing happened in time")


def final_grant(raw: Raw, sid: str) -> dict[str, Any]:
    """The final reply to the queued claim, keeping the lease alive meanwhile."""
    reply: dict[str, Any] = heartbeat_until(raw, sid, lambda: None)
    assert reply["ok"], reply
    return reply


def test_killed_session_loses_its_claims_within_its_lease(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """SIGKILL of a holder: its claims go within the lease; a waiter gets them."""
    fleet = fleet_factory(lease_ms=LEASE_MS)
    proc = fleet.spawn("holder", 7, "--hold", HELD, "--ops", "1000000")
    grant = held_grant(fleet, "holder")
    waiter = queue_waiter(fleet)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        reply = final_grant(waiter, "waiter")
    finally:
        waiter.close()
    ids = [row["id"] for row in grant["claims"]]
    when, reason = wait_for(lambda: released_at(fleet, ids), 5, "the release event")
    assert reason == "session_lost"
    assert when - killed <= LEASE_MS / 1000 + SLACK_S
    assert reply["fence"] > grant["fence"]
    scenario.check_all(fleet)


def test_session_stopped_past_its_lease_is_lost_then_recovers(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """SIGSTOP longer than the lease: claims released, fenced out, then rejoined."""
    fleet = fleet_factory(lease_ms=LEASE_MS)
    proc = fleet.spawn("holder", 8, "--hold", HELD, "--ops", "40")
    fleet.spawn("other", 9, "--ops", "40")
    grant = held_grant(fleet, "holder")
    waiter = queue_waiter(fleet)
    try:
        proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        reply = final_grant(waiter, "waiter")
        assert time.monotonic() - stopped <= LEASE_MS / 1000 + SLACK_S + 0.5
        proc.send_signal(signal.SIGCONT)
        assert waiter.request("leave", sid="waiter")["ok"]
    finally:
        waiter.close()
    assert reply["fence"] > grant["fence"]
    scenario.settle(fleet)
    figures = scenario.check_all(fleet)
    assert figures["ok.claim"] > 1


def test_partitioned_session_is_lost_and_rejoins_after_healing(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """A session cut off from the broker loses its lease; healed, it converges."""
    fleet = fleet_factory(lease_ms=LEASE_MS)
    proxy = PartitionProxy(f"ipc://{fleet.dir}/proxy.sock", fleet.broker.url)
    proxy.start()
    try:
        fleet.spawn("holder", 10, "--hold", HELD, "--ops", "60", url=proxy.front_url)
        fleet.spawn("other", 11, "--ops", "60")
        grant = held_grant(fleet, "holder")
        proxy.cut()
        ids = [row["id"] for row in grant["claims"]]
        _when, reason = wait_for(lambda: released_at(fleet, ids), 10, "the release")
        assert reason == "session_lost"
        proxy.heal()
        scenario.settle(fleet)
        scenario.check_all(fleet)
        assert proxy.dropped > 0
        fleet.close()
    finally:
        proxy.stop()


def test_slow_reader_detects_the_gap_and_resyncs(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """A session that stops reading while its queues overflow resyncs, then agrees.

    One request per batch makes one message per event, so the flood overflows
    the ten-message queue whatever the broker's batching of events.
    """
    fleet = fleet_factory(
        lease_ms=5000, broker_args=["--pub-hwm", "10", "--max-batch", "1"]
    )
    fleet.spawn("slow", 12, "--ops", "20", "--stall-after", "3", "--stall-s", "1")
    wait_for(lambda: noted(fleet, "slow", "stall"), 20, "the reader to stall")
    flood(fleet, 3000)
    scenario.settle(fleet)
    scenario.check_all(fleet, gaps_allowed=True)
    assert noted(fleet, "slow", "resync")


def noted(fleet: Fleet, sid: str, what: str) -> bool:
    """Whether worker ``sid`` recorded the note ``what``."""
    path = fleet.runs / f"{sid}.jsonl"
    return path.exists() and f'"what":"{what}"' in path.read_text()


def flood(fleet: Fleet, count: int) -> None:
    """Many claims-stream events at once from a raw session, pipelined."""
    raw = Raw(fleet.broker.url)
    try:
        assert raw.request("hello", repo=REPO, sid="flood", name="flood")["ok"]
        for n in range(count):
            raw.sock.send_json(
                {"op": "claim", "rid": f"c{n}", "sid": "flood", "scopes": [f"f/{n}"]}
            )
        replies = 0
        while replies < count:
            assert raw.recv(10) is not None
            replies += 1
        assert raw.request("leave", sid="flood")["ok"]
    finally:
        raw.close()


@pytest.mark.slow
def test_churn_of_sessions_joining_and_leaving(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """Dozens of short-lived sessions, a few at a time; everything agrees."""
    fleet = fleet_factory(lease_ms=LEASE_MS)
    for wave in range(10):
        procs = [
            fleet.spawn(f"c{wave}x{n}", wave * 10 + n, "--ops", "15") for n in range(4)
        ]
        fleet.wait_done([f"c{wave}x{n}" for n in range(4)])
        (fleet.runs / "quiet").touch()
        (fleet.runs / "exit").touch()
        for proc in procs:
            proc.wait(20)
        (fleet.runs / "quiet").unlink()
        (fleet.runs / "exit").unlink()
    scenario.check_all(fleet)


def test_after_a_restart_a_dead_session_keeps_its_claims_for_lease_and_grace(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """A session that died while the broker was down is lost after lease + grace."""
    fleet = fleet_factory(lease_ms=LEASE_MS, grace_ms=LEASE_MS)
    proc = fleet.spawn("holder", 13, "--hold", HELD, "--ops", "1000000")
    grant = held_grant(fleet, "holder")
    fleet.kill_broker()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    fleet.restart_broker()
    up = fleet.restarts[-1][1]
    ids = [row["id"] for row in grant["claims"]]
    when, reason = wait_for(lambda: released_at(fleet, ids), 10, "the release")
    assert reason == "session_lost"
    bound = 2 * LEASE_MS / 1000
    assert bound - SLACK_S <= when - up <= bound + SLACK_S
