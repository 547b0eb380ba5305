"""Timed work comes due in time in whichever of many repositories it lies.

The broker keeps when each repository next has a lease, TTL, wait or fact
come due, and sets it again when the repository's state changes. These
brokers publish heartbeats only once a minute, so the look at every
repository that each heartbeat also takes cannot stand in for a missed one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from fleetbus.client import AsyncSession
from fleetbus.errors import TimedOut
from fleetbus.facts import subscription_topics
from fleetbus.repo import RepoInfo
from fleetbus.scope import parse_scope
from tests.faults.harness import Raw
from tests.support.brokerproc import BrokerProcess

DEADLINE_S = 15.0
OTHER_REPOS = 50


@pytest.fixture
def crowded(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A broker with a one-second lease, heartbeats a minute apart, and
    other repositories each holding a claim for ten minutes."""
    broker = broker_factory(lease_ms=1000, extra_args=["--heartbeat-ms", "60000"])
    raw = Raw(broker.url)
    try:
        for n in range(OTHER_REPOS):
            hello = raw.request("hello", repo=f"other-{n}", sid=f"o{n}", lease=False)
            assert hello["ok"], hello
            claim = raw.request("claim", sid=f"o{n}", scopes=["a.py"], ttl_ms=600_000)
            assert claim["ok"], claim
    finally:
        raw.close()
    return broker


@pytest.fixture
async def join(
    crowded: BrokerProcess, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    root = tmp_path / "work"
    (root / "src").mkdir(parents=True)
    repo = RepoInfo(id=f"path:{root}", root=root, branch=None)
    sessions: list[AsyncSession] = []

    async def start(name: str) -> AsyncSession:
        session = await AsyncSession.connect(
            crowded.url, repo=repo, name=name, session_id=name
        )
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        await session.close(leave=False)


async def test_a_ttl_claim_expires_on_time(join: Callable[..., Any]) -> None:
    """A claim's TTL runs out and the file goes to the session waiting for it."""
    a, b = await join("a"), await join("b")
    held = await a.claim("src/a.py", ttl=0.2)
    granted = await b.claim("src/a.py", wait=DEADLINE_S)
    assert granted.fence > held.fence


async def test_a_wait_runs_out_at_the_broker(join: Callable[..., Any]) -> None:
    """The broker itself ends a wait at its deadline, naming what it gave up."""
    a, b = await join("a"), await join("b")
    await a.claim("src/b.py")
    with pytest.raises(TimedOut, match=r"gave up waiting for src/b\.py"):
        await b.claim("src/b.py", wait=0.2)


async def test_a_silent_session_loses_its_lease(
    join: Callable[..., Any], crowded: BrokerProcess
) -> None:
    """A session that claims and never speaks again loses its lease, and the
    file goes to the session waiting for it."""
    a = await join("a")
    raw = Raw(crowded.url)
    try:
        assert raw.request("hello", repo=a.repo.id, sid="silent")["ok"]
        assert raw.request("claim", sid="silent", scopes=["src/c.py"])["ok"]
    finally:
        raw.close()
    granted = await a.claim("src/c.py", wait=DEADLINE_S)
    assert [row.scope.text for row in granted.claims] == ["src/c.py"]


def test_a_fact_with_a_ttl_expires_on_time(crowded: BrokerProcess) -> None:
    """A fact's TTL runs out and its end is published with reason ``expired``."""
    raw = Raw(crowded.url)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    try:
        hello = raw.request("hello", repo="timed-facts", sid="f")
        sub.connect(hello["pub"])
        for prefix in subscription_topics("timed-facts", parse_scope("docs/")):
            sub.subscribe(prefix)
        # A subscription takes effect some time after it is made: publish
        # until one of them arrives, then the fact under test.
        for n in range(100):
            raw.request("publish", sid="f", topics=["docs/x.md"], body=f"probe {n}")
            if sub.poll(100):
                break
        else:
            raise AssertionError("the subscription never took effect")
        fact = raw.request(
            "publish", sid="f", topics=["docs/x.md"], body="brief", ttl_ms=200
        )["fact"]
        deadline = time.monotonic() + DEADLINE_S
        while True:
            left = max(0.0, deadline - time.monotonic())
            assert sub.poll(int(left * 1000)), "no fact.ended in time"
            event = orjson.loads(sub.recv_multipart()[-1])
            if event["type"] == "fact.ended" and fact["id"] in event["ids"]:
                break
        assert event["reason"] == "expired"
    finally:
        sub.close(linger=0)
        ctx.term()
        raw.close()
