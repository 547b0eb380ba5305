"""Timed work comes due in time in whichever of many repositories it lies.

The broker keeps when each repository next has a lease, TTL, wait or fact
come due, and sets it again when the repository's state changes. These
brokers publish heartbeats only once a minute, so the look at every
repository that each heartbeat also takes cannot stand in for a missed one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fleetbus.client import AsyncSession
from fleetbus.errors import TimedOut
from fleetbus.facts import FactEvent
from fleetbus.repo import RepoInfo
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


async def next_matching(
    stream: AsyncIterator[Any], accept: Callable[[Any], bool]
) -> Any:
    async def find() -> Any:
        async for item in stream:
            if accept(item):
                return item
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(find(), DEADLINE_S)


async def test_a_ttl_claim_expires_on_time(join: Callable[..., Any]) -> None:
    """A claim's TTL runs out and the claim is released."""
    a = await join("a")
    stream = a.events()
    grant = await a.claim("src/a.py", ttl=0.2)
    released = await next_matching(stream, lambda e: e["type"] == "claim.released")
    assert released["reason"] == "ttl_expired"
    assert released["ids"] == [row.id for row in grant.claims]


async def test_a_wait_runs_out_at_the_broker(join: Callable[..., Any]) -> None:
    """The broker itself ends a wait at its deadline, naming what it gave up."""
    a, b = await join("a"), await join("b")
    await a.claim("src/b.py")
    with pytest.raises(TimedOut, match=r"gave up waiting for src/b\.py"):
        await b.claim("src/b.py", wait=0.2)


async def test_a_silent_session_loses_its_lease(
    join: Callable[..., Any], crowded: BrokerProcess
) -> None:
    """A session that joins and never speaks again is lost with its lease."""
    a = await join("a")
    stream = a.events()
    raw = Raw(crowded.url)
    try:
        assert raw.request("hello", repo=a.repo.id, sid="silent")["ok"]
    finally:
        raw.close()
    lost = await next_matching(stream, lambda e: e["type"] == "session.lost")
    assert lost["sid"] == "silent"


async def test_a_fact_with_a_ttl_expires_on_time(join: Callable[..., Any]) -> None:
    """A fact's TTL runs out and its subscribers are told."""
    a = await join("a")
    await a.subscribe("docs/")
    events = a.fact_events()
    fact = await a.publish("docs/x.md", text="for a moment", ttl=0.2)

    def expired(event: FactEvent) -> bool:
        return event.type == "expired" and event.id == fact.id

    assert (await next_matching(events, expired)).id == fact.id
