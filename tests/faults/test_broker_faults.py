"""Faults of the broker's world: clock jumps, a full disk, a damaged store, retries."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetbus.broker.config import BrokerConfig
from tests.faults import checkers
from tests.faults.harness import Fleet, Raw, wait_for
from tests.faults.worker import REPO
from tests.support.brokerproc import BrokerProcess


def join(raw: Raw, sid: str) -> None:
    """Open a session ``sid`` on the fault repository."""
    reply = raw.request("hello", repo=REPO, sid=sid, name=sid)
    assert reply["ok"], reply


def events_of(fleet: Fleet, kind: str) -> list[dict[str, Any]]:
    """The observed claims-stream events of one type."""
    assert fleet.observer is not None
    with fleet.observer.lock:
        return [e for _t, _topic, e in fleet.observer.seen.events if e["type"] == kind]


def test_wall_clock_jumps_move_ttls_but_never_leases(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """Leases run on the monotonic clock; a TTL is a wall-clock deadline."""
    fleet = fleet_factory(lease_ms=1000)
    raw = Raw(fleet.broker.url)
    try:
        join(raw, "a")
        leased = raw.request("claim", sid="a", scopes=["src/lease.py"])
        timed = raw.request("claim", sid="a", scopes=["src/ttl.py"], ttl_ms=600_000)
        assert leased["ok"]
        assert timed["ok"]
        fleet.shift_clock(wall_ms=3_600_000, back=True)
        for _ in range(3):
            assert raw.request("heartbeat", sid="a")["ok"]
        later = raw.request("claim", sid="a", scopes=["src/later.py"])
        assert later["fence"] > timed["fence"]
        fleet.shift_clock(wall_ms=2 * 3_600_000)
        expired = wait_for(
            lambda: events_of(fleet, "claim.released"), 5, "the TTL to run out"
        )
        assert [e["reason"] for e in expired] == ["ttl_expired"]
        assert expired[0]["ids"] == [row["id"] for row in timed["claims"]]
        held = {row["scope"] for row in fleet.snapshot()["claims"]}
        assert held == {"src/lease.py", "src/later.py"}
        assert not events_of(fleet, "session.lost")
        fleet.shift_clock(mono_ms=5000)
        lost = wait_for(lambda: events_of(fleet, "session.lost"), 5, "the lease")
        assert lost[0]["sid"] == "a"
    finally:
        raw.close()
    with fleet.observer.lock:  # type: ignore[union-attr]
        checkers.check_claims_stream(fleet.observer.seen)  # type: ignore[union-attr]


@contextlib.contextmanager
def tiny_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path``; skips the test where not allowed."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_refuses_changes_and_loses_nothing(short_tmp: Path) -> None:
    """On a full disk changes are refused as unavailable; acknowledged ones stay."""
    workdir = short_tmp / "b"
    workdir.mkdir()
    with tiny_disk(workdir / "data", "600k"):
        broker = BrokerProcess(workdir, lease_ms=60_000).start()
        raw = Raw(broker.url)
        try:
            join(raw, "a")
            acked: list[str] = []
            refused = None
            for n in range(2000):
                reply = raw.request(
                    "publish", sid="a", topics=["src/"], body=f"{n} " + "x" * 3000
                )
                if not reply["ok"]:
                    refused = reply["error"]
                    break
                acked.append(reply["fact"]["id"])
            assert refused is not None, "the disk never filled"
            assert refused["code"] == "unavailable", refused
            assert raw.request("ping")["ok"]
            again = raw.request("claim", sid="a", scopes=["src/x.py"])
            assert not again["ok"] or again["fence"] > 0
            subprocess.run(
                ["mount", "-o", "remount,size=64m", str(workdir / "data")], check=True
            )
            after = raw.request("publish", sid="a", topics=["src/"], body="room again")
            assert after["ok"], after
            acked.append(after["fact"]["id"])
            broker.restart()
            found = raw.request("facts", repo=REPO, limit=10_000, include_history=True)
            assert set(acked) <= {fact["id"] for fact in found["facts"]}
        finally:
            raw.close()
            broker.kill()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _damage_garbage(db: Path) -> None:
    with db.open("r+b") as f:
        f.write(b"this is not a database file" * 4)


def _damage_truncate(db: Path) -> None:
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize(
    "damage", [_damage_garbage, _damage_truncate], ids=["garbage", "truncated"]
)
def test_damaged_store_stops_the_start_with_a_clear_error(
    short_tmp: Path, damage: Callable[[Path], None]
) -> None:
    """A damaged store is refused (exit 4, one clear line) and left as it was."""
    broker = BrokerProcess(short_tmp, lease_ms=60_000).start()
    raw = Raw(broker.url)
    try:
        join(raw, "a")
        for n in range(200):
            raw.request("claim", sid="a", scopes=[f"src/{n}.py"], ttl_ms=600_000)
            raw.request("publish", sid="a", topics=[f"src/{n}.py"], body="x" * 500)
    finally:
        raw.close()
    assert broker.stop() == 0
    db = broker.data_dir / "fleetbus.db"
    damage(db)
    before = _digest(db)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetbus.broker",
            "--url",
            broker.url,
            "--data",
            str(broker.data_dir),
            "--log-json",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 4, done.stderr.decode()
    assert b"broker.start_failed" in done.stderr
    assert b"Traceback" not in done.stderr
    assert _digest(db) == before


def test_retried_requests_apply_once_even_across_a_restart(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """A request repeated with its rid, before or after a restart, applies once."""
    fleet = fleet_factory(lease_ms=5000)
    raw = Raw(fleet.broker.url)
    try:
        join(raw, "a")
        claim = raw.request("claim", rid="c1", sid="a", scopes=["src/a.py"])
        fact = raw.request("publish", rid="p1", sid="a", topics=["src/"], body="x")
        assert raw.request("claim", rid="c1", sid="a", scopes=["src/a.py"]) == claim
        assert raw.request("publish", rid="p1", sid="a", topics=["src/"], body="x") == (
            fact
        )
        fleet.kill_broker()
        fleet.restart_broker()
        assert raw.request("claim", rid="c1", sid="a", scopes=["src/a.py"]) == claim
        assert raw.request("publish", rid="p1", sid="a", topics=["src/"], body="x") == (
            fact
        )
        released = raw.request("release", rid="r1", sid="a", grant=claim["grant"])
        assert released["released"] == [claim["claims"][0]["id"]]
        assert raw.request("release", rid="r1", sid="a", grant=claim["grant"]) == (
            released
        )
        snap = fleet.snapshot()
        assert snap["claims"] == []
        found = raw.request("facts", repo=REPO, scopes=["src/"])
        assert [f["id"] for f in found["facts"]] == [fact["fact"]["id"]]
    finally:
        raw.close()
    assert len(events_of(fleet, "claim.granted")) == 1


def remembered(fleet: Fleet) -> int:
    """Rows of remembered replies in the broker's store."""
    import sqlite3

    uri = f"file:{fleet.broker.data_dir / 'fleetbus.db'}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM requests").fetchone()[0])
    finally:
        db.close()


def test_remembered_replies_leave_the_store_after_the_retry_window(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """Replies kept for retries are pruned from the store, not kept forever."""
    fleet = fleet_factory(lease_ms=600_000)
    raw = Raw(fleet.broker.url)
    try:
        join(raw, "a")
        for n in range(5):
            assert raw.request("claim", sid="a", scopes=[f"old/{n}.py"])["ok"]
        assert remembered(fleet) >= 5
        window = BrokerConfig("", Path()).request_memory_s
        fleet.shift_clock(wall_ms=round((window + 60) * 1000))
        assert raw.request("claim", sid="a", scopes=["new.py"])["ok"]
        wait_for(lambda: remembered(fleet) == 1, 5, "old replies to be pruned")
    finally:
        raw.close()


def test_a_log_that_cannot_be_written_does_not_stop_the_broker(
    short_tmp: Path,
) -> None:
    """Regression: a log line failing to write (full disk, size limit) killed it.

    The broker's log file may not grow past its size; every request is still
    answered and the broker keeps running.
    """
    import resource

    broker = BrokerProcess(short_tmp, lease_ms=60_000).start()
    raw = Raw(broker.url)
    try:
        join(raw, "a")
        assert broker.proc is not None
        limit = broker.log_path.stat().st_size + 300
        resource.prlimit(broker.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        for n in range(20):
            reply = raw.request("claim", sid="a", scopes=[f"src/{n}.py"])
            assert reply["ok"] or reply["error"]["code"] == "unavailable", reply
        assert broker.proc.poll() is None
    finally:
        raw.close()
        broker.kill()
