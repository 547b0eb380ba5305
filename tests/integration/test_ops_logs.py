"""The broker's log: one JSON line per meaningful change, under stable names."""

from __future__ import annotations

import io
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from fleetbus import log, wire
from fleetbus.broker.config import BrokerConfig
from fleetbus.broker.server import Broker
from fleetbus.client import connect
from fleetbus.errors import Conflict
from tests.support.brokerproc import BrokerProcess

DEADLINE_S = 15.0
DIE_HOLDING = """
import os, sys
from fleetbus.client import connect
session = connect(sys.argv[1], repo=sys.argv[2], name="carol", session_id="l-carol")
session.claim("lib/", intent="dies holding it")
os._exit(0)
"""


def events(broker: BrokerProcess) -> list[dict[str, Any]]:
    """Every line the broker logged, each parsed as JSON."""
    return [orjson.loads(line) for line in broker.log().splitlines()]


def wait_for(broker: BrokerProcess, name: str, count: int = 1) -> list[dict[str, Any]]:
    """The broker's log once it holds ``count`` lines of event ``name``."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        logged = events(broker)
        if sum(1 for e in logged if e["event"] == name) >= count:
            return logged
        time.sleep(0.02)
    raise AssertionError(f"no {name} in the log:\n{broker.log()}")


def test_each_change_is_one_json_line_with_a_stable_name(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """Joins, grants, a refusal, a wait, a fact, releases, expiries and a loss."""
    with (
        connect(broker.url, repo=short_tmp, name="alice", session_id="l-alice") as a,
        connect(broker.url, repo=short_tmp, name="bob", session_id="l-bob") as b,
    ):
        grant = a.claim("src/", intent="refactor")
        with pytest.raises(Conflict):
            b.claim("src/x.py")
        waiter = threading.Thread(
            target=b.claim, args=("src/x.py",), kwargs={"wait": 10}, daemon=True
        )
        waiter.start()
        wait_for(broker, "claim.queued")
        a.publish("src/", text="tokens are cached")
        a.release(grant=grant.id)
        waiter.join(DEADLINE_S)
        b.claim("docs/", ttl=0.2)
        wait_for(broker, "claim.expired")
    subprocess.run(
        [sys.executable, "-c", DIE_HOLDING, broker.url, str(short_tmp)],
        check=True,
        timeout=60,
    )
    logged = wait_for(broker, "session.lost")

    info = [e for e in logged if e["level"] != "debug"]
    names = [e["event"] for e in info]
    for name in (
        "broker.started",
        "session.joined",
        "claim.granted",
        "claim.refused",
        "claim.queued",
        "fact.published",
        "claim.released",
        "claim.expired",
        "session.left",
        "session.lost",
    ):
        assert name in names, (name, names)
    assert names.count("claim.granted") == 4, "alice, bob after waiting, docs/, lib/"
    assert names.count("claim.refused") == 1
    assert names.count("session.joined") == 3
    refused = next(e for e in info if e["event"] == "claim.refused")
    assert refused["sid"] == "l-bob"
    assert refused["repo"]
    queued = next(e for e in info if e["event"] == "claim.queued")
    assert queued["repo"] == refused["repo"]
    joined = {e["sid"]: e["name"] for e in info if e["event"] == "session.joined"}
    assert "l-bob" in joined
    lost = next(e for e in info if e["event"] == "session.lost")
    assert lost["sid"] == "l-carol"
    expired = [e for e in info if e["event"] == "claim.expired"]
    assert {e["reason"] for e in expired} == {"ttl_expired", "session_lost"}
    assert "request.received" not in names, "traffic is logged at debug only"


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "is_json"), [(io.StringIO(), True), (Terminal(), False)]
)
def test_json_off_a_terminal_and_console_on_one(
    stream: io.StringIO, is_json: bool
) -> None:
    """Without a choice, the log is JSON lines unless it goes to a terminal."""
    try:
        log.configure("info", stream=stream)
        log.get("broker").info("claim.granted", sid="s1", seq=3)
    finally:
        log.configure("warning")

    line = stream.getvalue().strip()
    if is_json:
        assert orjson.loads(line)["event"] == "claim.granted"
    else:
        assert "claim.granted" in line
        assert "s1" in line
        assert not line.startswith("{")


def test_a_rolled_back_batch_logs_none_of_its_changes(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim whose commit fails is not logged as granted; its retry is."""
    config = BrokerConfig(url=f"ipc://{short_tmp}/b.sock", data_dir=short_tmp / "d")
    capture = structlog.testing.LogCapture()
    logged = capture.entries
    broker = Broker(config)
    broker.log = structlog.wrap_logger(
        None,
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    broker.start()
    try:
        assert broker.store is not None
        hello = {"op": "hello", "rid": "h", "sid": "s1", "repo": "r"}
        claim = {"op": "claim", "rid": "c", "sid": "s1", "scopes": ["src/"]}
        broker._handle([b"peer", wire.encode(hello)])
        broker.turn(drain=False)
        with monkeypatch.context() as patched:
            patched.setattr(broker.store, "commit", _disk_full)
            broker._handle([b"peer", wire.encode(claim)])
            broker.turn(drain=False)
        failed = [e["event"] for e in logged]
        broker._handle([b"peer", wire.encode(claim)])
        broker.turn(drain=False)
    finally:
        broker.close()
    assert "store.write_failed" in failed
    assert "session.joined" in failed
    assert "claim.granted" not in failed
    assert [e["event"] for e in logged].count("claim.granted") == 1


def _disk_full() -> None:
    raise sqlite3.OperationalError("database or disk is full")
