"""A session joins a repository whose snapshot is larger than a request may be."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fleetbus import wire
from fleetbus.client import AsyncSession
from fleetbus.errors import LimitExceeded
from fleetbus.repo import RepoInfo
from tests.support.brokerproc import BrokerProcess

CLAIMS = 2_048


def test_decode_keeps_the_request_limit_unless_told() -> None:
    """A body over the request limit is refused by default, taken with a limit."""
    body = wire.encode({"pad": "x" * wire.MAX_MESSAGE_BYTES})

    with pytest.raises(LimitExceeded):
        wire.decode(body)
    assert wire.decode(body, limit=wire.MAX_BROKER_MESSAGE_BYTES)["pad"]


async def test_session_joins_a_repo_with_a_snapshot_over_the_request_limit(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """A replica loads thousands of claims whose snapshot exceeds 256 KiB."""
    broker = broker_factory(lease_ms=60_000)
    repo = RepoInfo(id="test:large", root=tmp_path, branch=None)
    holder = await AsyncSession.connect(broker.url, repo=repo, name="holder")
    try:
        for start in range(0, CLAIMS, 64):
            await holder.claim(*(f"big/f{i}.py" for i in range(start, start + 64)))
        snapshot = await holder.snapshot()
        assert len(wire.encode(snapshot)) > wire.MAX_MESSAGE_BYTES

        joiner = await AsyncSession.connect(
            broker.url, repo=repo, name="joiner", timeout=10.0
        )
        try:
            assert len(joiner.claims()) == CLAIMS
            assert not joiner.may_edit("big/f7.py")
        finally:
            await joiner.close()
    finally:
        await holder.close()
