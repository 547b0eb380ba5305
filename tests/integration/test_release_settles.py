"""A release returns once the session's own replica has applied it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fleetbus.client import AsyncSession
from fleetbus.repo import RepoInfo
from tests.support.brokerproc import BrokerProcess


async def test_release_is_visible_in_the_replica_when_it_returns(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """Right after release() the replica no longer holds the released rows."""
    broker = broker_factory(lease_ms=60_000)
    repo = RepoInfo(id="test:release", root=tmp_path, branch=None)
    session = await AsyncSession.connect(broker.url, repo=repo, name="a")
    try:
        for round_ in range(20):
            grant = await session.claim(f"src/f{round_}.py", "src/shared.py")
            assert len(session.claims(mine=True)) == 2

            released = await session.release(grant=grant.id)

            assert sorted(released) == sorted(c.id for c in grant.claims)
            assert session.claims(mine=True) == []
            assert session.holders("src/shared.py") == []
    finally:
        await session.close()
