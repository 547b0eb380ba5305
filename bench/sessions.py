"""fleetbus sessions for the scenarios, and the children that run many of them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.children import say
from fleetbus.client.session import AsyncSession
from fleetbus.client.transport import ZmqTransport
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


def echo_claimers(url: str, first: str, count: str, seconds: str) -> None:
    """The ``claimers`` load against an echo, through the SDK's own transport.

    ``count`` tasks share one :class:`ZmqTransport`, as a process's sessions
    share one connection; each sends a claim, awaits its echo, sends a
    release and awaits that. What it reaches bounds what any broker can give
    this client shape on this machine.
    """
    start_at, duration = (float(x) for x in seconds.split(":"))
    asyncio.run(_echo_claimers(url, int(first), int(count), start_at, duration))


async def _echo_claimers(
    url: str, first: int, count: int, start_at: float, duration: float
) -> None:
    transport = ZmqTransport(url)
    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def deliver(reply: dict[str, Any]) -> None:
        future = waiting.pop(reply["rid"], None)
        if future is not None:
            future.set_result(reply)

    async def exchange(message: dict[str, Any]) -> None:
        future = waiting[message["rid"]] = loop.create_future()
        transport.send(message)
        await future

    async def pairs(worker: int, end: float) -> int:
        done = 0
        sid = f"w{worker}"
        while time.monotonic() < end:
            scope = f"{sid}/file{done % 64}.py"
            await exchange(
                {
                    "op": "claim",
                    "rid": f"{sid}c{done}",
                    "sid": sid,
                    "scopes": [scope],
                    "mode": "exclusive",
                    "intent": "",
                }
            )
            await exchange(
                {
                    "op": "release",
                    "rid": f"{sid}r{done}",
                    "sid": sid,
                    "grant": f"g{done}",
                }
            )
            done += 1
        return done

    transport.on_replies(deliver)
    try:
        await exchange({"op": "ping", "rid": f"ready{first}"})
        say(ready=True)
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        end = start_at + duration
        done = await asyncio.gather(*(pairs(first + i, end) for i in range(count)))
        say(pairs=sum(done), window=time.monotonic() - start_at)
    finally:
        transport.close()


CHILD_COMMANDS = {"claimers": claimers, "echo-claimers": echo_claimers}
