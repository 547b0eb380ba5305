"""fleetbus sessions for the scenarios, and the children that run many of them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.children import say
from fleetbus.client.session import AsyncSession
from fleetbus.repo import RepoInfo


def repo_info(root: Path, repo_id: str | None = None) -> RepoInfo:
    """A repository named without git, rooted at a scratch folder."""
    root.mkdir(parents=True, exist_ok=True)
    return RepoInfo(id=repo_id or f"bench:{root.name}", root=root, branch=None)


async def open_session(
    url: str, root: Path, name: str, *, repo_id: str | None = None, **options: Any
) -> AsyncSession:
    """Join the broker at ``url`` as a session of the bench repository."""
    options.setdefault("timeout", 30.0)
    return await AsyncSession.connect(
        url, repo=repo_info(root, repo_id), name=name, **options
    )


def claimers(url: str, root: str, first: str, count: str, seconds: str) -> None:
    """``count`` sessions, each claiming and releasing its own files in a loop.

    ``seconds`` is ``START:DURATION`` on the monotonic clock, which every
    process of the machine shares: all children start together and report the
    pairs done inside the same window.
    """
    start_at, duration = (float(x) for x in seconds.split(":"))
    asyncio.run(_claimers(url, Path(root), int(first), int(count), start_at, duration))


async def _claimers(
    url: str, root: Path, first: int, count: int, start_at: float, duration: float
) -> None:
    sessions = [
        await open_session(url, root, f"w{first + i}", repo_id="bench:pairs")
        for i in range(count)
    ]
    say(ready=True)
    try:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        end = start_at + duration
        done = await asyncio.gather(
            *(_pairs(s, first + i, end) for i, s in enumerate(sessions))
        )
        say(pairs=sum(done), window=time.monotonic() - start_at)
    finally:
        for session in sessions:
            await session.close()


async def _pairs(session: AsyncSession, worker: int, end: float) -> int:
    done = 0
    while time.monotonic() < end:
        grant = await session.claim(f"w{worker}/file{done % 64}.py")
        await session.release(grant=grant.id)
        done += 1
    return done


CHILD_COMMANDS = {"claimers": claimers}
